"""Checkpoint I/O: a full scale_runner checkpoint of a ~50M-parameter model with AdamW state
against writing/reading the same tensors with ``safetensors.torch.save_file``/``load_file``,
and, when installed, against MMEngine's and Lightning's checkpoint save/load of the same model
and optimizer.

All sides write to the same directory tree. scale_runner always fsyncs, checksums (XXH3-64 per
32 MiB piece) and verifies; the ratios are against ``save_file`` + fsync and ``load_file`` +
reading every tensor (``load_file`` alone only maps the file; it is shown too). Medians of
--reps interleaved reps.

Peers (skipped with a "not installed" line when ``importlib.util.find_spec`` finds no package):

- MMEngine: ``mmengine.runner.save_checkpoint`` of the dict its ``Runner.save_checkpoint``
  builds (``meta``, ``state_dict`` = ``weights_to_cpu(get_state_dict(model))``, ``optimizer``;
  without the message hub, whose ``HistoryBuffer`` torch >= 2.6 refuses to load with its
  default ``weights_only=True``), loaded with ``CheckpointLoader.load_checkpoint(path,
  map_location='cpu')``, the loader ``Runner.resume``/``load_checkpoint`` use (``torch.load``,
  reads everything). It pickles into memory and writes the bytes with ``open``/``write``.
- Lightning: ``Trainer.save_checkpoint`` of a bare ``Trainer`` (no progress bar, logger,
  checkpoint callback or model summary) that has run one ``fit`` step on a ``LightningModule``
  wrapping the same model and optimizer (the step happens before the measurements, so every
  variant writes the same values), loaded with ``trainer.strategy.load_checkpoint(path)``, what
  ``fit(ckpt_path=...)`` reads with (``torch.load``, reads everything). It pickles into memory
  and writes through an fsspec transaction (temporary file, then rename).

Neither peer fsyncs: their rows show the save as they do it, and after it ``+fsync``: the same
save followed by an fsync of the file (the fair comparison with the fsync'ed rows).

    python bench/checkpoint_io.py --reps 5
    python bench/checkpoint_io.py --reps 1 --width 512   # quick smoke run (~3M parameters)

``--sharded``: the same model under FSDP2 (``fully_shard``) on 2 gloo ranks, today's sharded
checkpoint (every rank writes its own shards) against the gathered one (whole tensors gathered
to rank 0, which writes them): save and load time and peak extra memory per rank. It launches
``bench/sharded_io_job.py`` with ``torch.distributed.run`` (see that file) and prints its tables:

    python bench/checkpoint_io.py --sharded --reps 5

Background saves (``async_save=True``) in a real training run: ``bench/async_checkpoint.py``.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PEERS = ('mmengine', 'lightning')


def lightning_trainer(model, opt, width):
    """A bare Trainer that has run one fit step on ``model``/``opt`` (so it can save)."""
    import torch
    import lightning.pytorch as pl
    for name in ('lightning', 'lightning.pytorch', 'lightning.fabric'):
        logging.getLogger(name).setLevel(logging.ERROR)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).sum()

        def configure_optimizers(self):
            return opt

    trainer = pl.Trainer(accelerator='cpu', devices=1, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    data = torch.utils.data.TensorDataset(torch.randn(2, width))
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=2))
    return trainer


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--width', type=int, default=2048, help='12 layers of width^2: 2048 -> ~50M params')
    p.add_argument('--sharded', action='store_true',
                   help='FSDP2 on 2 ranks: sharded vs gathered checkpoint (bench/sharded_io_job.py)')
    args = p.parse_args()
    if args.sharded:
        return sharded(args)
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from scale_runner.checkpoint import CheckpointWriter, read_checkpoint, split_tensors
    warnings.filterwarnings('ignore')
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(12)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, args.width)).sum().backward()
    opt.step()
    missing = [name for name in PEERS if importlib.util.find_spec(name) is None]
    trainer = None if 'lightning' in missing else lightning_trainer(model, opt, args.width)
    if 'mmengine' not in missing:
        from mmengine.logging import MMLogger
        from mmengine.runner import CheckpointLoader, get_state_dict, save_checkpoint, weights_to_cpu
        # print_log(logger='current') goes to the latest MMLogger: make it one at level ERROR
        # (save_checkpoint's own FileClient use logs a deprecation warning; loading logs INFO).
        MMLogger.get_instance('checkpoint_io', log_level='ERROR')
    n = sum(p.numel() for p in model.parameters())
    acc = Accelerator(cpu=True)
    root = Path(tempfile.mkdtemp(dir=os.environ.get('BENCH_DIR')))

    def fsync(path):
        with open(path, 'rb') as f:
            os.fsync(f.fileno())

    def baseline(sync: bool, materialize: bool = False):
        d = root / 'base'
        d.mkdir(exist_ok=True)
        t = time.perf_counter()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / 'model.safetensors')
        tensors: dict = {}
        split_tensors({'optimizer': opt.state_dict()}, tensors)
        save_file(tensors, d / 'optim.safetensors')
        if sync:
            fsync(d / 'model.safetensors')
            fsync(d / 'optim.safetensors')
        save_t = time.perf_counter() - t
        t = time.perf_counter()
        loaded = [load_file(d / 'model.safetensors'), load_file(d / 'optim.safetensors')]
        load_t = time.perf_counter() - t
        # load_file maps the file lazily; touching every tensor reads it (what a resume needs).
        t = time.perf_counter()
        for part in loaded:
            for v in part.values():
                v.clone()
        touch_t = time.perf_counter() - t
        shutil.rmtree(d)
        return save_t, (load_t, load_t + touch_t)[materialize]

    def ours():
        d = root / 'ckpt'
        state = {'optimizer': opt.state_dict(), 'train_state': {'iter': 1}}
        t = time.perf_counter()
        CheckpointWriter(acc).write(d, model.state_dict(), state)
        save_t = time.perf_counter() - t
        t = time.perf_counter()
        read_checkpoint(d)
        load_t = time.perf_counter() - t
        shutil.rmtree(d)
        return save_t, load_t

    def mmengine():
        d = root / 'mmengine'
        d.mkdir(exist_ok=True)
        path = d / 'iter_1.pth'
        t = time.perf_counter()
        save_checkpoint({'meta': {'epoch': 0, 'iter': 1},
                         'state_dict': weights_to_cpu(get_state_dict(model)),
                         'optimizer': opt.state_dict()}, str(path))
        save_t = time.perf_counter() - t
        fsync(path)
        sync_t = time.perf_counter() - t
        t = time.perf_counter()
        CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
        load_t = time.perf_counter() - t
        shutil.rmtree(d)
        return save_t, load_t, sync_t

    def lightning():
        d = root / 'lightning'
        d.mkdir(exist_ok=True)
        path = d / 'last.ckpt'
        t = time.perf_counter()
        trainer.save_checkpoint(path)
        save_t = time.perf_counter() - t
        fsync(path)
        sync_t = time.perf_counter() - t
        t = time.perf_counter()
        trainer.strategy.load_checkpoint(path)
        load_t = time.perf_counter() - t
        shutil.rmtree(d)
        return save_t, load_t, sync_t

    variants = {'save_file / load_file (lazy mmap)': lambda: baseline(False),
                'save_file+fsync / load_file+read': lambda: baseline(True, materialize=True),
                'scale_runner': ours}
    labels = {'mmengine': 'mmengine save/load_checkpoint',
              'lightning': 'lightning Trainer.save/load_checkpoint'}
    for name, f in (('mmengine', mmengine), ('lightning', lightning)):
        if name not in missing:
            variants[labels[name]] = f
    res = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, f in variants.items():
            res[k].append(f())
    shutil.rmtree(root)
    print(f'model: {n / 1e6:.1f}M parameters, AdamW state; medians of {args.reps}')
    base = res['save_file+fsync / load_file+read']
    bs, bl = statistics.median(s for s, _ in base), statistics.median(l for _, l in base)
    for k, v in res.items():
        s, l = statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)
        line = f'{k:<38} save {s:6.3f} s ({s / bs:4.2f}x)   load {l:6.3f} s ({l / bl:4.2f}x)'
        if len(v[0]) > 2:  # a peer: it does not fsync; the same save followed by an fsync
            f = statistics.median(x[2] for x in v)
            line += f'   no fsync; +fsync: save {f:6.3f} s ({f / bs:4.2f}x)'
        print(line)
    for name in missing:
        print(f'{name + ":":<38} not installed, skipped')


def sharded(args) -> None:
    """Run ``sharded_io_job.py`` on 2 fresh ranks (its output is the table)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                        'MASTER_PORT', 'ACCELERATE_USE_CPU')}
    env['OMP_NUM_THREADS'] = '1'
    job = Path(__file__).with_name('sharded_io_job.py')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(job), '--width', str(args.width), '--reps', str(args.reps)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    print(proc.stdout, end='')
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)


if __name__ == '__main__':
    main()
