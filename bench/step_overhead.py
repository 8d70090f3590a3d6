"""Per-step cost of scale_runner against a plain PyTorch loop and a hand-written Accelerate loop.

Workload (issue 9): a 32->64->32 MLP, batch 64, in-memory data, AdamW, one thread, one epoch.
Each variant runs in its own fresh process; variants are interleaved over the repetitions and
the median per-step time is reported with its ratio to the plain loop. The final loss of every
variant is printed too: scale_runner's must equal the plain loop's bit for bit.

    python bench/step_overhead.py --steps 3000 --reps 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SEED = 0
DIM, HIDDEN, BATCH = 32, 64, 64


def _setup(steps):
    import torch
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(steps * BATCH, DIM, generator=g)
    y = torch.randn(steps * BATCH, DIM, generator=g)
    return torch, torch.utils.data.TensorDataset(x, y)


def _model(torch):
    from accelerate.utils import set_seed
    set_seed(SEED)
    return torch.nn.Sequential(torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, DIM))


def plain(steps):
    torch, ds = _setup(steps)
    model = _model(torch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)
    t0 = time.perf_counter()
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0, loss.item()


def accelerate_loop(steps):
    torch, ds = _setup(steps)
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model = _model(torch)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)
    model, opt, loader = acc.prepare(model, opt, loader)
    t0 = time.perf_counter()
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
    return time.perf_counter() - t0, loss.item()


def _net_class(torch):
    """The same MLP as a module returning its loss (the runner's model contract)."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _model(torch)

        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.net(x), y)
    return Net


def runner(steps, extra_hooks=0):
    torch, ds = _setup(steps)
    from scale_runner import Hook, Runner

    Net = _net_class(torch)

    class Idle(Hook):
        def before_train(self, runner):
            pass

    times = {}

    class Clock(Hook):
        priority = 'HIGHEST'

        def before_train(self, runner):
            times['t0'] = time.perf_counter()

        def after_train(self, runner):
            times['t1'] = time.perf_counter()

    work_dir = tempfile.mkdtemp()
    r = Runner(model=Net, work_dir=work_dir,
               train_dataloader=dict(dataset=ds, batch_size=BATCH,
                                     sampler=dict(type='DefaultSampler', shuffle=False)),
               train_cfg=dict(by_epoch=True, max_epochs=1),
               optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
               default_hooks=dict(logger=dict(interval=10), checkpoint=dict(interval=-1, save_last=True)),
               custom_hooks=[Clock()] + [Idle() for _ in range(extra_hooks)],
               randomness=dict(seed=SEED), accelerator=dict(cpu=True), log_level='WARNING')
    # The model class is built after seeding, like the plain loop's model.
    r._model_cfg = dict(type=Net)
    r.model = None
    r.train()
    loss = float(r.log_buffer.current['loss'])
    return times['t1'] - times['t0'], loss


def flat(steps):
    """Per-step time in each sixth of one long run, relative to the first sixth."""
    torch, ds = _setup(steps // 6)  # one epoch = a sixth: epoch transitions are included
    from scale_runner import Hook, Runner

    Net = _net_class(torch)

    marks = []

    class Sixths(Hook):
        def before_train(self, runner):
            marks.append(time.perf_counter())

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter % (steps // 6) == 0:
                marks.append(time.perf_counter())

    Runner(model=Net(), work_dir=tempfile.mkdtemp(),
           train_dataloader=dict(dataset=ds, batch_size=BATCH),
           train_cfg=dict(by_epoch=False, max_iters=steps),
           optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
           default_hooks=dict(checkpoint=dict(interval=-1, save_last=True)),
           custom_hooks=[Sixths()], randomness=dict(seed=SEED), accelerator=dict(cpu=True),
           log_level='WARNING').train()
    parts = [b - a for a, b in zip(marks, marks[1:])]
    return parts


VARIANTS = {'plain': plain, 'accelerate': accelerate_loop, 'scale_runner': runner,
            'scale_runner+20 idle hooks': lambda s: runner(s, extra_hooks=20)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--steps', type=int, default=3000)
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--one', help=argparse.SUPPRESS)
    p.add_argument('--flat', type=int, metavar='STEPS',
                   help='instead: per-sixth step time of one run of STEPS iterations (e.g. 30000)')
    args = p.parse_args()
    if args.flat:
        parts = flat(args.flat)
        print('sixth  us/step  vs first')
        for i, t in enumerate(parts, 1):
            print(f'{i:>5}  {t / (args.flat // 6) * 1e6:7.1f}  {t / parts[0]:7.3f}')
        return
    if args.one:
        seconds, loss = VARIANTS[args.one](args.steps)
        print(json.dumps({'seconds': seconds, 'loss': loss}))
        return
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    results = {name: [] for name in VARIANTS}
    losses = {}
    for rep in range(args.reps):
        for name in VARIANTS:
            out = subprocess.run([sys.executable, __file__, '--one', name, '--steps', str(args.steps)],
                                 capture_output=True, text=True, env=env, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            results[name].append(rec['seconds'] / args.steps * 1e6)
            losses[name] = rec['loss']
    base = statistics.median(results['plain'])
    print(f'{"variant":<28} {"us/step":>9} {"ratio":>7}  final loss')
    for name, vals in results.items():
        med = statistics.median(vals)
        print(f'{name:<28} {med:9.1f} {med / base:7.3f}  {losses[name]!r}')


if __name__ == '__main__':
    main()
