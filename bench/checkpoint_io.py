"""Checkpoint I/O: a full scale_runner checkpoint of a ~50M-parameter model with AdamW state
against writing/reading the same tensors with ``safetensors.torch.save_file``/``load_file``.

Both sides write to the same directory tree. scale_runner always fsyncs, hashes (sha256) and
verifies; the ratios are against ``save_file`` + fsync and ``load_file`` + reading every tensor
(``load_file`` alone only maps the file; it is shown too). Medians of --reps interleaved reps.

    python bench/checkpoint_io.py --reps 5
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--width', type=int, default=2048, help='12 layers of width^2: 2048 -> ~50M params')
    args = p.parse_args()
    import torch
    from accelerate import Accelerator
    from safetensors.torch import load_file, save_file

    from scale_runner.checkpoint import CheckpointWriter, read_checkpoint, split_tensors
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(args.width, args.width) for _ in range(12)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, args.width)).sum().backward()
    opt.step()
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

    res = {'save_file / load_file (lazy mmap)': [], 'save_file+fsync / load_file+read': [],
           'scale_runner': []}
    for _ in range(args.reps):
        res['save_file / load_file (lazy mmap)'].append(baseline(False))
        res['save_file+fsync / load_file+read'].append(baseline(True, materialize=True))
        res['scale_runner'].append(ours())
    shutil.rmtree(root)
    print(f'model: {n / 1e6:.1f}M parameters, AdamW state; medians of {args.reps}')
    base = res['save_file+fsync / load_file+read']
    bs, bl = statistics.median(s for s, _ in base), statistics.median(l for _, l in base)
    for k, v in res.items():
        s, l = statistics.median(x for x, _ in v), statistics.median(x for _, x in v)
        print(f'{k:<36} save {s:6.3f} s ({s / bs:4.2f}x)   load {l:6.3f} s ({l / bl:4.2f}x)')


if __name__ == '__main__':
    main()
