"""tests/test_multinode.py's parts: deterministic regression data, a dropout MLP (so each
rank's RNG stream matters), and a hook that holds one rank at an iteration until a signal has
reached it (the test's "mid-training" point)."""

import os
import time
from pathlib import Path

import torch
from torch import nn

from scale_runner.hooks.hook import Hook
from scale_runner.registry import DATASETS, HOOKS, MODELS


@DATASETS.register_module()
class MultinodeData(torch.utils.data.Dataset):
    """``size`` samples ``dict(x, y)`` of a fixed linear map plus noise."""

    def __init__(self, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, 4, generator=g)
        self.y = self.x @ torch.randn(4, 1, generator=g) + 0.1 * torch.randn(size, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'x': self.x[i], 'y': self.y[i]}


@MODELS.register_module()
class MultinodeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, x, y=None):
        pred = self.net(x)
        return {'pred': pred, 'loss': nn.functional.mse_loss(pred, y)} if y is not None else {'pred': pred}


@HOOKS.register_module()
class MultinodeGate(Hook):
    """``MN_GATE='<iter>:<rank>:<dir>'``: after iteration ``iter`` every rank writes
    ``<dir>/at_<iter>_rank<r>``; rank ``rank`` then waits (at most 120 s) until the
    preemption handler of its process has recorded a signal, so the signal is agreed at
    exactly that iteration. Runs before CheckpointHook's preemption check (priority NORMAL)."""

    def __init__(self):
        spec = os.environ.get('MN_GATE', '')
        self.spec = spec.split(':', 2) if spec else None

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if not self.spec or runner.iter != int(self.spec[0]):
            return
        rank = runner.accelerator.process_index
        Path(self.spec[2], f'at_{runner.iter}_rank{rank}').write_text(str(os.getpid()))
        if rank != int(self.spec[1]):
            return
        preemption = runner.get_hook('CheckpointHook').preemption
        deadline = time.monotonic() + 120
        while not preemption.signum and time.monotonic() < deadline:
            time.sleep(0.05)
