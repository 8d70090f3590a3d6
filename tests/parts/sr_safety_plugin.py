"""tests/test_config_safety.py's plugin module: data configs list it in ``custom_imports`` and
name its classes by registered name (SafetyData, SafetyNet) or dotted path (PlainData)."""

import torch

from scale_runner.registry import DATASETS, MODELS
from sr_models import PlainRegressor
from sr_metrics import MSE  # re-exported: importing this module registers the configs' 'MSE'

__all__ = ['PlainData', 'SafetyData', 'SafetyNet', 'MSE']


class PlainData(torch.utils.data.Dataset):
    """Not registered: a data config names it as sr_safety_plugin.PlainData."""

    def __init__(self, n=16, dim=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'x': self.x[i], 'y': self.y[i]}


@DATASETS.register_module(force=True)
class SafetyData(PlainData):
    pass


@MODELS.register_module(force=True)
class SafetyNet(PlainRegressor):
    """conftest's PlainRegressor, registered from a plugin module."""
