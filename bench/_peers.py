"""The issue-9 workload, and the same workload on MMEngine's Runner and on Lightning.

Shared by the bench scripts (not part of the test suite). The workload: a 32->64->32 MLP,
batch 64, an in-memory ``TensorDataset`` through a ``DataLoader`` (no shuffling), AdamW with
lr 1e-3, one torch thread. The MLP is initialised right after seeding torch with ``SEED``
(what ``accelerate.utils.set_seed`` does on CPU), so every framework starts from the same
weights.

Each builder takes three optional callables, called from inside the framework:
``on_start()`` when training starts, ``on_stop()`` when it ends, ``on_iter()`` after every
iteration (after the optimizer step). The per-iteration callback is only installed when given,
so timing runs add no per-iteration work of their own.
"""
from __future__ import annotations

import importlib.util
import logging
import random
import warnings

SEED = 0
DIM, HIDDEN, BATCH, LR = 32, 64, 64, 1e-3


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def quiet() -> None:
    """Silence warnings and framework chatter (bench children print one result line)."""
    warnings.filterwarnings('ignore')
    for name in ('lightning', 'lightning.pytorch', 'lightning.fabric', 'pytorch_lightning',
                 'lightning_fabric', 'mmengine'):
        logging.getLogger(name).setLevel(logging.ERROR)


def dataset(n_batches: int):
    """``n_batches`` batches of random (x, y) pairs, in memory; sets one torch thread."""
    import torch
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(n_batches * BATCH, DIM, generator=g)
    y = torch.randn(n_batches * BATCH, DIM, generator=g)
    return torch.utils.data.TensorDataset(x, y)


def seed_all(seed: int = SEED) -> None:
    """``accelerate.utils.set_seed`` on CPU, without importing accelerate."""
    import torch
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
        numpy.random.seed(seed)
    except ImportError:
        pass


def mlp():
    """The 32->64->32 MLP, initialised right after seeding."""
    import torch
    seed_all()
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, DIM))


def loader(ds, shuffle: bool = False):
    """Batches of ``BATCH`` in order, or (``shuffle``) in a new random order each pass, drawn
    from a generator of its own (the global RNG is left to the model)."""
    import torch
    if not shuffle:
        return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(SEED))


# ---- MMEngine ---------------------------------------------------------------------------------
def mmengine_runner(ds, work_dir, *, epochs=1, iter_based=False, on_start=None, on_stop=None,
                    on_iter=None):
    """MMEngine's ``Runner`` with its default hooks (logger every 10 iterations, checkpoint at
    the end), no validation. ``iter_based``: ``IterBasedTrainLoop`` for ``epochs`` passes."""
    import torch.nn.functional as F
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x, y=None, mode='loss'):
            out = self.net(x)
            return dict(loss=F.mse_loss(out, y)) if mode == 'loss' else out

    class Probe(Hook):
        priority = 'HIGHEST'

        def before_train(self, runner):
            if on_start:
                on_start()

        def after_train(self, runner):
            if on_stop:
                on_stop()

    class IterProbe(Probe):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            on_iter()

    n = len(ds) // BATCH
    if iter_based:
        train_cfg = dict(by_epoch=False, max_iters=epochs * n)
        checkpoint = dict(type='CheckpointHook', by_epoch=False, interval=epochs * n)
    else:
        train_cfg = dict(by_epoch=True, max_epochs=epochs)
        checkpoint = dict(type='CheckpointHook', by_epoch=True, interval=epochs)
    return Runner(
        model=Net(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=ds, batch_size=BATCH,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=train_cfg,
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=LR)),
        default_hooks=dict(logger=dict(type='LoggerHook', interval=10), checkpoint=checkpoint),
        custom_hooks=[IterProbe() if on_iter else Probe()],
        log_processor=dict(by_epoch=not iter_based),
        # ERROR: at WARNING it prints notices (no dataset metainfo, FileClient deprecation) and
        # one per epoch transition of the iteration loop; INFO lines are skipped either way.
        randomness=dict(seed=SEED), log_level='ERROR')


def mmengine_last_loss(runner) -> float:
    return float(runner.message_hub.get_scalar('train/loss').current())


# ---- Lightning --------------------------------------------------------------------------------
def lightning_fit(ds, root_dir, *, defaults=False, epochs=1, on_start=None, on_stop=None,
                  on_iter=None):
    """Train with ``lightning.pytorch``; return the last loss and the ``Trainer``.

    Bare: no progress bar, logger, checkpointing or model summary. ``defaults``: the Trainer's
    default progress bar, logger (TensorBoard when installed, else CSV) and checkpointing, with
    ``log_every_n_steps=10`` and the module logging its loss (``self.log``) every step. With
    ``rich`` installed, Lightning 2.6's defaults are ``RichProgressBar`` and ``RichModelSummary``
    (TQDM otherwise); ``describe(trainer)`` names what was used.
    """
    import torch
    import torch.nn.functional as F
    import lightning.pytorch as pl
    quiet()  # lightning sets its loggers' levels on import

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.last = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            self.last['loss'] = loss
            if defaults:
                self.log('train_loss', loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=LR)

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            if on_start:
                on_start()

        def on_train_end(self, trainer, pl_module):
            if on_stop:
                on_stop()

    class IterProbe(Probe):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            on_iter()

    if defaults:
        options = dict(default_root_dir=str(root_dir), log_every_n_steps=10)
    else:
        options = dict(enable_progress_bar=False, logger=False, enable_checkpointing=False,
                       enable_model_summary=False)
    trainer = pl.Trainer(max_epochs=epochs, accelerator='cpu', devices=1,
                         callbacks=[IterProbe() if on_iter else Probe()], **options)
    model = Net()
    trainer.fit(model, train_dataloaders=loader(ds))
    return float(model.last['loss']), trainer


def describe(trainer) -> str:
    """The Trainer's callbacks and logger, e.g. ``RichProgressBar, ModelCheckpoint, TensorBoardLogger``."""
    names = [type(c).__name__ for c in trainer.callbacks if type(c).__name__ not in ('Probe', 'IterProbe')]
    names += [type(lg).__name__ for lg in trainer.loggers]
    return ', '.join(names) or 'no callbacks, no logger'
