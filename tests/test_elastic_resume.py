"""Resume on a different number of processes (issue 17): real launches over gloo.

A run on ``P`` processes stops mid-epoch; ``--resume`` on ``P'`` continues from the same
*global* sample of the epoch's order, so every sample of that epoch is used exactly once,
and the counters and the schedule continue.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PARTS_DIR, pythonpath

CFG = PARTS_DIR / 'elastic_cfg.py'


def _train(work: Path, processes: int, *options: str, resume: bool = False) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath())
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc_per_node', str(processes), '-m', 'scale_runner'] if processes > 1
                else [sys.executable, '-m', 'scale_runner'])
    cmd = [*launcher, 'train', str(CFG), '--work-dir', str(work), *(['--resume'] if resume else []),
           '--cfg-options', *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=work.parent, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def _seen(work: Path) -> list[dict]:
    rows = []
    for path in sorted(work.glob('seen_rank*.jsonl')):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


@pytest.mark.parametrize('before, after, first_iters', [(2, 1, 3), (1, 2, 4), (2, 3, 3)],
                         ids=['2to1', '1to2', '2to3'])
def test_resume_on_another_number_of_processes_uses_every_sample_once(tmp_path, before, after,
                                                                     first_iters):
    work = tmp_path / 'work'
    work.mkdir()
    _train(work, before, f'train_cfg.max_iters={first_iters}')
    used = first_iters * 2 * before           # samples of epoch 1 the first run trained on
    left = (24 - used) // (2 * after)         # iterations the epoch has left on `after` processes
    out = _train(work, after, f'train_cfg.max_iters={first_iters + left + 1}', resume=True)
    assert f'{before} -> {after} processes' in out and 'not bit-identical' in out, out[-3000:]
    assert f'global batch {2 * before} -> {2 * after}' in out, out[-3000:]
    rows = _seen(work)
    epoch1 = sorted(i for r in rows if r['epoch'] == 0 and not (r['iter'] > first_iters
                                                                 and r['processes'] == before)
                    for i in r['idx'])
    assert epoch1 == list(range(24)), epoch1  # every sample of the epoch once, across both runs
    resumed = [r for r in rows if r['processes'] == after]
    assert min(r['iter'] for r in resumed) == first_iters + 1  # the counters continue
    assert {r['epoch'] for r in resumed} == {0, 1}  # the epoch ended, the next one started
    # the optimizer's update count and the schedule continue from the checkpoint
    from scale_runner.checkpoint import find_resumable
    state = find_resumable(work / 'checkpoints')['state']
    total = first_iters + left + 1
    assert state['train_state']['iter'] == total and state['optim_wrapper']['update_count'] == total
    assert state['param_schedulers.0']['last_step'] == total
    assert state['meta']['world_size'] == after
