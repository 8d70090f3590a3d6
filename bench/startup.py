"""Startup cost: imports, ``scale-runner --help``, and process start to first training step.

Each measurement is a fresh process; variants are interleaved and the median of --reps is
reported. When installed, MMEngine and Lightning are measured too (``import mmengine.runner``,
``import lightning``; process start to the end of the first training step of an MMEngine
``Runner`` with its default hooks and of a bare Lightning ``Trainer``: no progress bar, logger,
checkpointing or model summary) on the same workload: a 32->64->32 MLP, a ``TensorDataset`` of
640x32, batch 64, AdamW. A peer that is not installed (``importlib.util.find_spec``) is skipped
with a "not installed" line. Children run with warnings ignored and peers' loggers at ERROR.

    python bench/startup.py --reps 5
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time

FIRST_STEP = r'''
import os, sys, time
T0 = float(os.environ['BENCH_T0'])
import warnings
warnings.simplefilter('ignore')
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
elif sys.argv[1] == 'mmengine':
    import tempfile
    from mmengine.hooks import Hook
    from mmengine.model import BaseModel
    from mmengine.runner import Runner
    class Net(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        def forward(self, x, y=None, mode='loss'):
            return dict(loss=torch.nn.functional.mse_loss(self.net(x), y))
    class FirstStep(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            report()
    Runner(model=Net(), work_dir=tempfile.mkdtemp(),
           train_dataloader=dict(dataset=ds, batch_size=64, collate_fn=dict(type='default_collate'),
                                 sampler=dict(type='DefaultSampler', shuffle=False)),
           train_cfg=dict(by_epoch=True, max_epochs=1),
           optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)),
           custom_hooks=[FirstStep()], log_level='ERROR').train()
elif sys.argv[1] == 'lightning':
    import logging
    import lightning.pytorch as pl
    for name in ('lightning', 'lightning.pytorch', 'lightning.fabric'):
        logging.getLogger(name).setLevel(logging.ERROR)
    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)
    class FirstStep(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            report()
    pl.Trainer(max_epochs=1, accelerator='cpu', devices=1, enable_progress_bar=False, logger=False,
               enable_checkpointing=False, enable_model_summary=False,
               callbacks=[FirstStep()]).fit(Net(), torch.utils.data.DataLoader(ds, batch_size=64))
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


# package -> (module whose import is timed, first-step row label)
PEERS = {'mmengine': ('mmengine.runner', 'first step: mmengine runner'),
         'lightning': ('lightning', 'first step: lightning (bare)')}


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def wall(cmd, env=None) -> float:
    env = dict(os.environ if env is None else env, PYTHONWARNINGS='ignore')
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return time.perf_counter() - t


def first_step(kind: str) -> float:
    env = dict(os.environ, BENCH_T0=repr(time.time()), OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    out = subprocess.run([sys.executable, '-c', FIRST_STEP, kind], check=True, capture_output=True,
                         text=True, env=env).stdout
    return float(out.split('FIRST_STEP')[1].split()[0])


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    args = p.parse_args()
    exe = sys.executable
    cli = os.path.join(os.path.dirname(exe), 'scale-runner')
    peers = [pkg for pkg in PEERS if installed(pkg)]
    # pip byte-compiles every package it installs, except an editable one, which Python compiles
    # on first import and caches — never where PYTHONDONTWRITEBYTECODE is set (this VM sets it),
    # which would add the compilation of scale_runner (~0.3 s) to every start. Compile it once,
    # as a regular install would have.
    import compileall
    spec = importlib.util.find_spec('scale_runner')
    compileall.compile_dir(os.path.dirname(spec.origin), quiet=1)

    def imp(module):
        return lambda: wall([exe, '-c', f'import {module}'])

    def step(kind):
        return lambda: first_step(kind)

    probes = {
        'python -c pass': lambda: wall([exe, '-c', 'pass']),
        'import torch': imp('torch'),
        'import accelerate': imp('accelerate'),
        **{f'import {PEERS[pkg][0]}': imp(PEERS[pkg][0]) for pkg in peers},
        'import scale_runner': imp('scale_runner'),
        'from scale_runner import Runner': lambda: wall([exe, '-c', 'from scale_runner import Runner']),
        'scale-runner --help': lambda: wall([cli, '--help']),
        'first step: accelerate loop': step('accelerate'),
        **{PEERS[pkg][1]: step(pkg) for pkg in peers},
        'first step: scale_runner': step('scale_runner'),
    }
    res = {k: [] for k in probes}
    for _ in range(args.reps):
        for k, f in probes.items():
            res[k].append(f())
    for k, v in res.items():
        print(f'{k:<34} {statistics.median(v):7.3f} s')
    for pkg in PEERS:
        if pkg not in peers:
            print(f'{pkg + ":":<34} not installed, skipped (import {PEERS[pkg][0]}, first step)')
    med = {k: statistics.median(v) for k, v in res.items()}
    print(f'\nimport scale_runner - import accelerate: {med["import scale_runner"] - med["import accelerate"]:+.3f} s')
    print(f'first step, scale_runner - accelerate loop: '
          f'{med["first step: scale_runner"] - med["first step: accelerate loop"]:+.3f} s')
    for pkg in peers:
        module, label = PEERS[pkg]
        print(f'import {module} - import accelerate: '
              f'{med[f"import {module}"] - med["import accelerate"]:+.3f} s')
        print(f'first step, scale_runner - {label[12:]}: '
              f'{med["first step: scale_runner"] - med[label]:+.3f} s')


if __name__ == '__main__':
    main()
