"""Do finished 2-process runs exit 0? Counts aborts at interpreter exit (issue 15, part 1).

Each run is a fresh ``torchrun --standalone --nproc_per_node 2`` on the CPU (gloo): a short
spiral_mlp training with dataloader workers and a validation, through

- ``cli``: ``-m scale_runner train`` (the CLI ends with ``shutdown.exit_process``);
- ``api``: a user script calling ``Runner.train()`` and then simply ending (the runner's
  ``atexit`` drain);
- ``plain``: a hand-written Accelerate loop with one gather at the end and no scale_runner
  code: torch's own rate, for reference.

A run counts as aborted when its exit code is not 0 or its output says ``terminate called``.

    python bench/exit_aborts.py --runs 100 --modes cli,api
    python bench/exit_aborts.py --runs 30 --modes plain
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / 'configs' / 'spiral_mlp.py'
OPTIONS = {'train_cfg.max_epochs': 1, 'train_cfg.val_interval': 1,
           'train_dataloader.num_workers': 2, 'train_dataloader.dataset.size': 1024,
           'default_hooks.logger.interval': 4}

API = '''
import sys
from scale_runner import Config
from scale_runner.registry import RUNNERS
cfg = Config.fromfile(sys.argv[1])
cfg.merge_from_dict({**%r, 'work_dir': sys.argv[2]})
RUNNERS.build(cfg).train()
'''

PLAIN = '''
import torch
from accelerate import Accelerator
acc = Accelerator(cpu=True)
model = torch.nn.Linear(8, 1)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(256, 8)),
                                   batch_size=16, num_workers=2)
model, opt, data = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), data)
for (x,) in data:
    acc.backward(model(x).square().mean())
    opt.step()
    opt.zero_grad()
print(acc.gather(torch.tensor([acc.process_index])).tolist())
'''


def command(mode: str, tmp: Path) -> list[str]:
    run = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2']
    work = str(tmp / 'work')
    if mode == 'cli':
        opts = [f'{k}={v}' for k, v in OPTIONS.items()]
        return run + ['-m', 'scale_runner', 'train', str(CFG), '--work-dir', work, '--cfg-options', *opts]
    script = tmp / f'{mode}.py'
    script.write_text(API % OPTIONS if mode == 'api' else PLAIN)
    return run + [str(script), str(CFG), work]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--runs', type=int, default=100)
    p.add_argument('--modes', default='cli,api', help='comma-separated: cli, api, plain')
    args = p.parse_args()
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    for mode in args.modes.split(','):
        aborted, t0 = [], time.perf_counter()
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                proc = subprocess.run(command(mode, Path(tmp)), capture_output=True, text=True,
                                      env=env, cwd=tmp, timeout=300)
            if proc.returncode != 0 or 'terminate called' in proc.stdout + proc.stderr:
                aborted.append(i + 1)
                print(f'{mode}: run {i + 1} exited {proc.returncode}\n{proc.stderr[-1500:]}',
                      file=sys.stderr)
        print(f'{mode}: {len(aborted)} of {args.runs} runs aborted {aborted or ""} '
              f'({time.perf_counter() - t0:.0f} s)', flush=True)


if __name__ == '__main__':
    main()
