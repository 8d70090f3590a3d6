"""Startup cost: imports, ``scale-runner --help``, and process start to first training step.

Each measurement is a fresh process; variants are interleaved and the median of --reps is
reported.

    python bench/startup.py --reps 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

FIRST_STEP = r'''
import os, sys, time
T0 = float(os.environ['BENCH_T0'])
import torch
torch.set_num_threads(1)
ds = torch.utils.data.TensorDataset(torch.randn(640, 32), torch.randn(640, 32))
def report():
    print(f'FIRST_STEP {time.time() - T0:.4f}', flush=True)
    os._exit(0)
if sys.argv[1] == 'accelerate':
    from accelerate import Accelerator
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    model, opt, loader = acc.prepare(model, opt, loader)
    for x, y in loader:
        loss = torch.nn.functional.mse_loss(model(x), y)
        acc.backward(loss); opt.step(); opt.zero_grad()
        report()
else:
    import tempfile
    from scale_runner import Hook, Runner
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        def forward(self, x, y):
            return torch.nn.functional.mse_loss(self.net(x), y)
    class FirstStep(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            report()
    Runner(model=Net(), work_dir=tempfile.mkdtemp(), train_dataloader=dict(dataset=ds, batch_size=64),
           train_cfg=dict(max_epochs=1), optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
           custom_hooks=[FirstStep()], accelerator=dict(cpu=True), log_level='WARNING').train()
'''


def wall(cmd, env=None) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def first_step(kind: str) -> float:
    env = dict(os.environ, BENCH_T0=repr(time.time()), OMP_NUM_THREADS='1')
    out = subprocess.run([sys.executable, '-c', FIRST_STEP, kind], check=True, capture_output=True,
                         text=True, env=env).stdout
    return float(out.split('FIRST_STEP')[1].split()[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    args = p.parse_args()
    exe = sys.executable
    cli = os.path.join(os.path.dirname(exe), 'scale-runner')
    probes = {
        'python -c pass': lambda: wall([exe, '-c', 'pass']),
        'import torch': lambda: wall([exe, '-c', 'import torch']),
        'import accelerate': lambda: wall([exe, '-c', 'import accelerate']),
        'import scale_runner': lambda: wall([exe, '-c', 'import scale_runner']),
        'from scale_runner import Runner': lambda: wall([exe, '-c', 'from scale_runner import Runner']),
        'scale-runner --help': lambda: wall([cli, '--help']),
        'first step: accelerate loop': lambda: first_step('accelerate'),
        'first step: scale_runner': lambda: first_step('scale_runner'),
    }
    res = {k: [] for k in probes}
    for _ in range(args.reps):
        for k, f in probes.items():
            res[k].append(f())
    for k, v in res.items():
        print(f'{k:<34} {statistics.median(v):7.3f} s')
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f'\nimport scale_runner - import accelerate: {med["import scale_runner"] - med["import accelerate"]:+.3f} s')
    print(f'first step, scale_runner - accelerate loop: '
          f'{med["first step: scale_runner"] - med["first step: accelerate loop"]:+.3f} s')


if __name__ == '__main__':
    main()
