"""The hook library on 2 real processes (gloo on the CPU): NaN guard, SyncBuffersHook, EMA on DDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

PARTS = r'''
import json, math, os
import torch
from torch import nn
from scale_runner import METRICS, BaseMetric
from scale_runner.hooks import Hook
from scale_runner.model import unwrap
from scale_runner.registry import DATASETS, HOOKS, MODELS


@DATASETS.register_module()
class Reg(torch.utils.data.Dataset):
    def __init__(self, size=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=g) * 3 + 1
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'x': self.x[i], 'y': self.y[i]}


@MODELS.register_module()
class BNNet(nn.Module):
    """Linear-BatchNorm-Linear; the training forward call number NAN_AT on rank NAN_RANK
    returns a NaN loss (on that rank only)."""

    def __init__(self, nan_at=0, nan_rank=1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
        self.nan_at, self.nan_rank, self.calls = nan_at, nan_rank, 0

    def forward(self, x, y=None):
        pred = self.net(x)
        out = {'pred': pred}
        if y is not None:
            out['loss'] = nn.functional.mse_loss(pred, y)
            if self.training:
                self.calls += 1
                if self.calls == self.nan_at and int(os.environ.get('RANK', 0)) == self.nan_rank:
                    out['loss'] = out['loss'] * math.nan
        return out


@METRICS.register_module()
class MSE(BaseMetric):
    def process(self, data_batch, data_samples):
        for p, y in zip(data_samples['pred'], data_batch['y']):
            self.results.append(float((p - y).pow(2).mean()))

    def compute_metrics(self, results):
        return {'mse': sum(results) / len(results)}


def _bufs(runner):
    return {k: v.tolist() for k, v in unwrap(runner.model).named_buffers() if v.is_floating_point()}


@HOOKS.register_module()
class Probe(Hook):
    """Per rank: BN buffers before/after SyncBuffersHook, the weights validation runs with, EMA."""

    priority = 'HIGHEST'

    def __init__(self):
        self.records = []

    def before_val_epoch(self, runner):
        self.records.append({'pre': _bufs(runner)})

    def before_val_iter(self, runner, batch_idx, data_batch=None):
        if batch_idx == 0:
            ema = runner.get_hook('EMAHook')
            self.records[-1].update(
                post=_bufs(runner),
                val_weights={k: v.tolist() for k, v in unwrap(runner.model).named_parameters()},
                ema={k: v.tolist() for k, v in ema.ema_state_dict.items()},
                wrapped=type(runner.model).__name__)

    def after_val(self, runner):  # EMAHook has swapped training's weights back
        self.records[-1]['train_weights'] = {k: v.tolist() for k, v in unwrap(runner.model).named_parameters()}
        rank = runner.accelerator.process_index
        if True:
            (runner.work_dir / f'probe_rank{rank}.json').write_text(json.dumps(self.records))
'''

CONFIG = '''
custom_imports = dict(imports=['hl_parts'])
model = dict(type='BNNet', nan_at=11, nan_rank=1)
train_dataloader = dict(dataset=dict(type='Reg', size=64), batch_size=8,
                        sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(dataset=dict(type='Reg', size=16, seed=1), batch_size=8)
val_evaluator = dict(type='MSE')
val_cfg = dict()
train_cfg = dict(by_epoch=True, max_epochs=3)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=1, max_keep_ckpts=-1))
custom_hooks = [dict(type='Probe'), dict(type='SyncBuffersHook'), dict(type='EMAHook', momentum=0.3)]
randomness = dict(seed=0)
experiment_name = 'run'
'''


def test_two_ranks_nan_stops_everyone_sync_buffers_and_ema_on_ddp(tmp_path):
    """64 samples / (8 x 2 ranks) = 4 iterations per epoch. Epoch 1 validates (SyncBuffersHook,
    EMA swapped in on a DDP model); rank 1's loss is NaN at iteration 11 (epoch 3): both ranks
    stop there with the message, and no checkpoint exists after iteration 10."""
    (tmp_path / 'hl_parts.py').write_text(PARTS)
    (tmp_path / 'cfg.py').write_text(CONFIG)
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1',
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get('PYTHONPATH', '')]))
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    work = tmp_path / 'work'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', '0', '-m', 'scale_runner', 'train', str(tmp_path / 'cfg.py'),
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
