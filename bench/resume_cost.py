"""Resume cost against the position: resuming at iteration 20,000 of a map-style dataset must
take about as long as resuming at iteration 100 (the sampler starts at the offset; skipped
samples are never read).

For each position N and each framework: train N iterations for real (checkpoint at the end),
then time a resumed run from the start of its ``train()``/``fit()`` call to the end of its
first resumed iteration, counting dataset reads. Medians of --reps; the frameworks are
interleaved within each repetition. Workload: a 32->32 linear model, SGD, batch 8 of an
in-memory map-style dataset of 200,000 samples (25,000 batches), shuffled with a seeded sampler.

- scale_runner: ``DefaultSampler(shuffle=True)``, in this process.
- MMEngine (when installed): ``Runner`` with ``IterBasedTrainLoop`` (``max_iters``),
  ``DefaultSampler(shuffle=True)``, its default hooks (logger interval 10,000, checkpoint at
  the end), resumed with ``resume=True, load_from=<its iter_N.pth>``. MMEngine skips the
  trained batches by iterating the dataloader through all of them ("Advance dataloader N
  steps"), so its resume cost grows with N; the read count shows it.
- Lightning (when installed): a bare ``Trainer`` (no progress bar, logger or model summary)
  with ``max_steps``; the checkpoint is written mid-epoch by
  ``ModelCheckpoint(every_n_train_steps=N)``, and resumed with ``fit(ckpt_path=...)``. The
  ``DataLoader`` is shuffled with a seeded generator, so the script can tell which batch the
  first resumed step trained on: with a plain (not ``state_dict``-resumable) ``DataLoader``,
  Lightning 2.x restores its step counters but restarts the epoch's data at its first batch,
  so it reads nothing extra but trains again on samples it has already seen. The output says
  which batch it got.

Each peer runs in its own worker process (``--worker NAME``; one per peer, started once, fed
one position per measurement over stdin) so that its imports, logging and global state stay
out of the others'. A peer that is not installed (``importlib.util.find_spec``) is skipped with
a "not installed" line. Workers ignore warnings, run MMEngine at log level ERROR and Lightning's
loggers at ERROR.

Notes: MMEngine deep-copies its dataloader config, dataset included; the dataset returns
itself from ``__deepcopy__`` (its tensors are read-only) so the read counter is shared and a
51 MB copy is not part of MMEngine's timing. MMEngine 0.10.7 calls ``torch.load`` without
``weights_only``; since torch 2.6 that defaults to ``True``, which refuses MMEngine's own
checkpoints (the message hub's ``HistoryBuffer``), so its worker sets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (the checkpoints are the worker's own).

    python bench/resume_cost.py --reps 5
    python bench/resume_cost.py --reps 1 --positions 100,2000   # quick smoke run
    python bench/resume_cost.py --stream --reps 3   # a streamed dataset (bench/stream_resume_cost.py)
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import itertools
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings

import torch

PEERS = ('mmengine', 'lightning')
N_SAMPLES, BATCH = 8 * 25_000, 8


class CountingData(torch.utils.data.Dataset):
    def __init__(self, n=N_SAMPLES):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
        self.reads = 0
        self.first: list[int] = []  # the first BATCH indices read since the last reset()

    def reset(self):
        self.reads = 0
        self.first = []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        if len(self.first) < BATCH:
            self.first.append(int(i))
        return self.x[i], self.y[i]

    def __deepcopy__(self, memo):
        return self  # read-only tensors; MMEngine deep-copies its dataloader config


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.lin(x), y)


def run(work_dir, data, max_iters, resume, clock=None):
    from accelerate.state import AcceleratorState, GradientState

    from scale_runner import Hook, Runner
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    class First(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if clock is not None and 'end' not in clock:
                clock['end'] = time.perf_counter()

    r = Runner(model=Net(), work_dir=work_dir,
               train_dataloader=dict(dataset=data, batch_size=BATCH,
                                     sampler=dict(type='DefaultSampler', shuffle=True)),
               train_cfg=dict(by_epoch=False, max_iters=max_iters),
               optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
               default_hooks=dict(logger=dict(interval=10_000),
                                  checkpoint=dict(interval=-1, save_last=True)),
               custom_hooks=[First()], resume=resume, randomness=dict(seed=0),
               accelerator=dict(cpu=True), log_level='WARNING')
    if clock is not None:
        clock['start'] = time.perf_counter()
    r.train()
    r.close()


# ---- peers (run inside a worker process) ------------------------------------------------------
def mmengine_run(work_dir, data, max_iters, resume=None, clock=None):
    """MMEngine Runner, IterBasedTrainLoop; checkpoint iter_<max_iters>.pth at the end."""
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class MMNet(BaseModel):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)

        def forward(self, x, y=None, mode='loss'):
            return dict(loss=torch.nn.functional.mse_loss(self.lin(x), y))

    class First(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if clock is not None and 'end' not in clock:
                clock['end'] = time.perf_counter()
                clock['iter'] = runner.iter + 1  # 0-based index of the iteration just run

    r = Runner(model=MMNet(), work_dir=work_dir, experiment_name=f'resume_{uuid.uuid4().hex}',
               train_dataloader=dict(dataset=data, batch_size=BATCH,
                                     sampler=dict(type='DefaultSampler', shuffle=True),
                                     collate_fn=dict(type='default_collate')),
               train_cfg=dict(by_epoch=False, max_iters=max_iters),
               optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
               default_hooks=dict(logger=dict(type='LoggerHook', interval=10_000),
                                  checkpoint=dict(type='CheckpointHook', by_epoch=False,
                                                  interval=max_iters)),
               log_processor=dict(by_epoch=False),
               custom_hooks=[First()], randomness=dict(seed=0), log_level='ERROR',
               load_from=resume, resume=resume is not None)
    if clock is not None:
        clock['start'] = time.perf_counter()
    r.train()
    return os.path.join(work_dir, f'iter_{max_iters}.pth')


def _lightning_loader(dataset):
    return torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def lightning_run(root, data, max_steps, ckpt=None, save_every=None, clock=None):
    """Bare Lightning Trainer with max_steps; ``save_every``: ModelCheckpoint every N steps."""
    import lightning.pytorch as pl
    for name in ('lightning', 'lightning.pytorch', 'lightning.fabric'):
        logging.getLogger(name).setLevel(logging.ERROR)

    class PLNet(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(32, 32)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.lin(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class First(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if clock is not None and 'end' not in clock:
                clock['end'] = time.perf_counter()
                clock['iter'] = trainer.global_step  # after the optimizer step

    callbacks = [First()]
    if save_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(dirpath=root, every_n_train_steps=save_every,
                                                      save_top_k=-1))
    trainer = pl.Trainer(accelerator='cpu', devices=1, max_steps=max_steps, logger=False,
                         enable_checkpointing=bool(save_every), enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=root, callbacks=callbacks)
    model, loader = PLNet(), _lightning_loader(data)
    if clock is not None:
        clock['start'] = time.perf_counter()
    trainer.fit(model, loader, ckpt_path=ckpt)
    if save_every:
        (path,) = glob.glob(os.path.join(root, f'*step={save_every}.ckpt'))
        return path


def worker(name, positions):
    """Make the peer's checkpoints, print READY, then answer one position per stdin line."""
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    if name == 'mmengine':
        os.environ['TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD'] = '1'
    data = CountingData()
    root = tempfile.mkdtemp()
    ckpts, expected = {}, {}
    for pos in positions:
        d = os.path.join(root, f'pos{pos}')
        if name == 'mmengine':
            ckpts[pos] = mmengine_run(d, data, pos)
        else:
            ckpts[pos] = lightning_run(d, data, pos + 1, save_every=pos)
            # The batches an uninterrupted run trains on: batch 0 and batch `pos` of the epoch.
            batches = _lightning_loader(range(len(data)))
            it = iter(batches)
            first = next(it).tolist()
            expected[pos] = (first, next(itertools.islice(it, pos - 1, None)).tolist())
    print('READY', flush=True)
    for n, line in enumerate(sys.stdin):
        pos = int(line)
        clock: dict = {}
        data.reset()
        d = os.path.join(root, f'pos{pos}', f'r{n}')
        if name == 'mmengine':
            mmengine_run(d, data, pos + 1, resume=ckpts[pos], clock=clock)
        else:
            lightning_run(d, data, pos + 1, ckpt=ckpts[pos], clock=clock)
        out = dict(ms=(clock['end'] - clock['start']) * 1e3, reads=data.reads, iter=clock['iter'])
        if name == 'lightning':
            first, at_pos = expected[pos]
            out['batch'] = 'batch 0' if data.first == first else (
                f'batch {pos}' if data.first == at_pos else 'another batch')
        print('RESULT ' + json.dumps(out), flush=True)
    shutil.rmtree(root, ignore_errors=True)


class Peer:
    """A worker process for one peer."""

    def __init__(self, name, positions):
        self.name = name
        self.err = tempfile.TemporaryFile('w+')
        env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), '--worker', name,
             '--positions', ','.join(map(str, positions))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True, env=env)

    def _read(self, tag):
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
        self.err.seek(0)
        raise RuntimeError(f'{self.name} worker exited:\n{self.err.read()[-3000:]}')

    def ready(self):
        self._read('READY')

    def measure(self, pos):
        self.proc.stdin.write(f'{pos}\n')
        self.proc.stdin.flush()
        return json.loads(self._read('RESULT '))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--positions', default='100,20000')
    p.add_argument('--worker', choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument('--stream', action='store_true',
                   help='a streamed dataset instead (bench/stream_resume_cost.py, issue 20)')
    args = p.parse_args()
    positions = list(map(int, args.positions.split(',')))
    if args.stream:
        from stream_resume_cost import main as stream_main  # bench/ is this script's directory
        return stream_main(args.reps, positions)
    if args.worker:
        return worker(args.worker, positions)
    torch.set_num_threads(1)
    missing = [name for name in PEERS if importlib.util.find_spec(name) is None]
    # Peers make their checkpoints in their own processes while this one makes scale_runner's.
    peers = [Peer(name, positions) for name in PEERS if name not in missing]
    data = CountingData()
    dirs = {}
    for pos in positions:
        dirs[pos] = tempfile.mkdtemp()
        run(dirs[pos], data, pos, resume=False)
    for peer in peers:
        peer.ready()
    names = ['scale_runner'] + [peer.name for peer in peers]
    res = {(name, pos): [] for name in names for pos in positions}
    for pos in positions:
        for rep in range(args.reps):
            clock: dict = {}
            data.reset()
            run(dirs[pos] + f'/r{rep}', data, pos + 1, resume=dirs[pos] + f'/checkpoints/iter_{pos}',
                clock=clock)
            res['scale_runner', pos].append(
                dict(ms=(clock['end'] - clock['start']) * 1e3, reads=data.reads))
            for peer in peers:
                res[peer.name, pos].append(peer.measure(pos))
    for peer in peers:
        peer.close()
    med = {}
    for name in names:
        for pos in positions:
            rs = res[name, pos]
            med[name, pos] = statistics.median(r['ms'] for r in rs)
            line = (f'{name:<12} resume at iteration {pos:>6}: {med[name, pos]:8.1f} ms to the first '
                    f'step, {statistics.median(r["reads"] for r in rs):7.0f} samples read')
            if 'iter' in rs[0]:
                line += f'; ran iteration {rs[0]["iter"]}'
            if 'batch' in rs[0]:
                line += f' on {rs[0]["batch"]} of the epoch' + (
                    ' (restarted the epoch: samples already trained on are seen again)'
                    if rs[0]['batch'] == 'batch 0' else '')
            print(line)
    for name in missing:
        print(f'{name:<12} not installed, skipped')
    lo, hi = min(positions), max(positions)
    for name in names:
        print(f'ratio {hi} vs {lo} ({name}): {med[name, hi] / med[name, lo]:.3f}')


if __name__ == '__main__':
    main()
