"""tests/test_elastic_resume.py's parts: a dataset whose samples carry their index, and a hook
that records, per rank, the indices each train iteration used."""

import json

import torch

from scale_runner.hooks.hook import Hook
from scale_runner.registry import DATASETS, HOOKS, MODELS
from sr_models import PlainRegressor


@DATASETS.register_module()
class IndexedToy(torch.utils.data.Dataset):
    """``size`` samples ``dict(x, y, idx)``; ``idx`` is the sample's index."""

    def __init__(self, size: int = 24):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'x': self.x[i], 'y': self.y[i], 'idx': i}


@MODELS.register_module()
class IndexedRegressor(PlainRegressor):
    def forward(self, x, y=None, idx=None):
        return super().forward(x, y)


@HOOKS.register_module()
class RecordIndices(Hook):
    """Appends ``{"iter", "epoch", "idx", "processes"}`` per train iteration to
    ``seen_rank<r>.jsonl`` in the work dir."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        rank = runner.accelerator.process_index
        row = {'iter': runner.iter, 'epoch': runner.epoch, 'idx': data_batch['idx'].tolist(),
               'processes': runner.accelerator.num_processes}
        with open(runner.work_dir / f'seen_rank{rank}.jsonl', 'a') as f:
            f.write(json.dumps(row) + '\n')


@MODELS.register_module()
class IndexedMLP(torch.nn.Module):
    """A two-layer regressor whose layers shard evenly over 2 or 3 ranks (12 rows)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.ReLU(), torch.nn.Linear(12, 1))

    def forward(self, x, y=None, idx=None):
        pred = self.net(x)
        return {'pred': pred, 'loss': torch.nn.functional.mse_loss(pred, y)} if y is not None else {'pred': pred}
