"""Resume on a different number of processes (issue 17): real launches over gloo.

A run on ``P`` processes stops mid-epoch; ``--resume`` on ``P'`` continues from the same
*global* sample of the epoch's order, so every sample of that epoch is used exactly once,
and the counters and the schedule continue.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PARTS_DIR, pythonpath

CFG = PARTS_DIR / 'elastic_cfg.py'
FSDP_CFG = PARTS_DIR / 'elastic_fsdp_cfg.py'


def _train(work: Path, processes: int, *options: str, resume: bool = False, cfg: Path = CFG) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath())
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc_per_node', str(processes), '-m', 'scale_runner'] if processes > 1
                else [sys.executable, '-m', 'scale_runner'])
    cmd = [*launcher, 'train', str(cfg), '--work-dir', str(work), *(['--resume'] if resume else []),
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


def _epoch1(rows: list[dict]) -> list[int]:
    """The indices epoch 1 trained on, across both runs and all ranks, sorted."""
    return sorted(i for r in rows if r['epoch'] == 0 for i in r['idx'])


@pytest.mark.parametrize('before, after, first_iters', [
    (2, 1, 3), (1, 2, 4), pytest.param(2, 3, 3, marks=pytest.mark.slow)],  # 3 ranks: slow (suite time)
                         ids=['2to1', '1to2', '2to3'])
def test_resume_on_another_number_of_processes_uses_every_sample_once(tmp_path, before, after,
                                                                     first_iters):
    work = tmp_path / 'work'
    work.mkdir()
    _train(work, before, f'train_cfg.max_iters={first_iters}', 'default_hooks.checkpoint.async_save=True')
    used = first_iters * 2 * before           # samples of epoch 1 the first run trained on
    left = (24 - used) // (2 * after)         # iterations the epoch has left on `after` processes
    out = _train(work, after, f'train_cfg.max_iters={first_iters + left + 1}', resume=True)
    assert f'{before} -> {after} processes' in out and 'not bit-identical' in out, out[-3000:]
    assert f'global batch {2 * before} -> {2 * after}' in out, out[-3000:]
    rows = _seen(work)
    epoch1 = _epoch1(rows)
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


def _export(ckpt: Path, out: Path, *flags: str) -> dict:
    """``scale-runner export`` in a plain process (no torch.distributed): the full tensors."""
    from safetensors.torch import load_file
    proc = subprocess.run([sys.executable, '-m', 'scale_runner', 'export', str(ckpt), str(out), *flags],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return load_file(out)


@pytest.mark.slow  # 80 s on 2 cores; the default suite keeps test_sharding's FSDP2 resume
def test_fsdp2_resumes_exactly_on_the_same_ranks_and_resharded_on_others(tmp_path):
    """FSDP2 (fully_shard from accelerator.fsdp) with a sharded EMA: a 2-rank run stopped at
    iteration 3 resumes bit for bit on 2 ranks (weights and EMA average, exported from the
    sharded checkpoints, against a run that saved in the background), and resharded on 1 and
    on 3 ranks with every sample used once."""
    first, total = 3, 7
    straight = tmp_path / 'straight'
    straight.mkdir()
    # written in the background (async_save): DCP's writer and the save's agreements on a
    # thread of their own; the resumed runs below save synchronously, and compare equal
    out = _train(straight, 2, f'train_cfg.max_iters={total}', 'default_hooks.checkpoint.async_save=True',
                 cfg=FSDP_CFG)
    assert 'in the background' in out
    ckpt = straight / 'checkpoints' / f'iter_{total}'
    assert not (ckpt / 'model.safetensors').exists() and len(list((ckpt / 'sharded').iterdir())) == 2
    stopped = tmp_path / 'stopped'
    stopped.mkdir()
    _train(stopped, 2, f'train_cfg.max_iters={first}', cfg=FSDP_CFG)
    for after in (2, 1, 3):
        work = tmp_path / f'on{after}'
        shutil.copytree(stopped, work)
        left = (24 - first * 2 * 2) // (2 * after)
        end = total if after == 2 else first + left + 1
        out = _train(work, after, f'train_cfg.max_iters={end}', resume=True, cfg=FSDP_CFG)
        rows = _seen(work)
        assert _epoch1(rows) == list(range(24)), (after, rows)
        if after == 2:
            assert 'not bit-identical' not in out
            for flags in ((), ('--ema',)):
                want = _export(ckpt, tmp_path / 'want.safetensors', *flags)
                got = _export(work / 'checkpoints' / f'iter_{total}', tmp_path / 'got.safetensors', *flags)
                assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), flags
        else:
            assert f'2 -> {after} processes' in out and 'not bit-identical' in out, out[-3000:]
            weights = _export(work / 'checkpoints' / f'iter_{end}', tmp_path / f'w{after}.safetensors')
            assert weights['net.0.weight'].shape == (12, 4)


@pytest.mark.slow
def test_fsdp2_resumes_inside_an_accumulation_window_exactly(tmp_path):
    """FSDP2 with accumulative_counts=2, resumed from iteration 3 (inside a window): the
    sharded gradients are saved as shards and the run ends bit-identical to one never stopped."""
    options = ('optim_wrapper.accumulative_counts=2', 'default_hooks.checkpoint.max_keep_ckpts=-1')
    straight = tmp_path / 'straight'
    straight.mkdir()
    _train(straight, 2, 'train_cfg.max_iters=7', *options, cfg=FSDP_CFG)
    doc = json.loads((straight / 'checkpoints' / 'iter_3' / 'state.json').read_text())
    assert 'grads' in doc  # the window's gradients, sharded
    work = tmp_path / 'resumed'
    work.mkdir()
    shutil.copytree(straight / 'checkpoints' / 'iter_3', work / 'iter_3')
    _train(work, 2, 'train_cfg.max_iters=7', *options, f'resume={work / "iter_3"}', cfg=FSDP_CFG)
    want = _export(straight / 'checkpoints' / 'iter_7', tmp_path / 'want.safetensors')
    got = _export(work / 'checkpoints' / 'iter_7', tmp_path / 'got.safetensors')
    assert all(torch.equal(want[k], got[k]) for k in want)
