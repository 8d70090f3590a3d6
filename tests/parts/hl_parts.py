"""tests/test_hook_library_dist.py's parts (its config, hl_cfg.py, lists this module in
``custom_imports``): data, a BatchNorm model with a NaN loss on one rank, a probe hook."""

import json
import math
import os

import torch
from torch import nn

from scale_runner.hooks import Hook
from scale_runner.model import unwrap
from scale_runner.registry import DATASETS, HOOKS, MODELS
from sr_metrics import MSE  # re-exported: importing this module registers the config's 'MSE'

__all__ = ['Reg', 'BNNet', 'MSE', 'Probe']


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
        self.records[-1]['train_weights'] = {
            k: v.tolist() for k, v in unwrap(runner.model).named_parameters()}
        rank = runner.accelerator.process_index
        if True:
            (runner.work_dir / f'probe_rank{rank}.json').write_text(json.dumps(self.records))
