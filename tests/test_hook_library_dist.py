"""The hook library on 2 real processes (gloo on the CPU): NaN guard, SyncBuffersHook, EMA on DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PARTS_DIR, pythonpath

CONFIG = PARTS_DIR / 'hl_cfg.py'  # imports tests/parts/hl_parts.py


def test_two_ranks_nan_stops_everyone_sync_buffers_and_ema_on_ddp(tmp_path):
    """64 samples / (8 x 2 ranks) = 4 iterations per epoch. Epoch 1 validates (SyncBuffersHook,
    EMA swapped in on a DDP model); rank 1's loss is NaN at iteration 11 (epoch 3): both ranks
    stop there with the message, and no checkpoint exists after iteration 10."""
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1',
               PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    work = tmp_path / 'work'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', '0', '-m', 'scale_runner', 'train', str(CONFIG),
           '--work-dir', str(work)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'hang?\n{e.stdout}\n{e.stderr}')
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    # every rank stopped at iteration 11 with the message (rank 1 was the NaN one)
    for rank in (0, 1):
        assert f'non-finite loss at iteration 11 (epoch 3) [rank 1: NaN] (seen on rank {rank})' in out, out
    assert out.count('NonFiniteLossError') >= 2, out
    ckpts = sorted(int(p.name[5:]) for p in (work / 'checkpoints').glob('iter_*'))
    assert ckpts == list(range(1, 11)), ckpts
    # SyncBuffersHook: before validation the BN statistics differ across ranks; after, every
    # rank has their mean
    p0, p1 = (json.loads((work / f'probe_rank{r}.json').read_text()) for r in (0, 1))
    assert len(p0) == len(p1) == 2  # validations after epochs 1 and 2
    for r0, r1 in zip(p0, p1):
        assert r0['wrapped'] == 'DistributedDataParallel'
        for k in ('net.1.running_mean', 'net.1.running_var'):
            a, b = torch.tensor(r0['pre'][k]), torch.tensor(r1['pre'][k])
            assert not torch.allclose(a, b), k
            assert r0['post'][k] == r1['post'][k], k
            assert torch.allclose(torch.tensor(r0['post'][k]), (a + b) / 2, atol=1e-6), k
        # EMA on DDP: the same average on both ranks, and validation runs with it
        assert r0['ema'] == r1['ema'] and r0['val_weights'] == r0['ema']
        assert r0['train_weights'] == r1['train_weights'] and r0['train_weights'] != r0['ema']
