"""MMEngine's "15 minutes to get started" tutorial on scale_runner, with the imports changed.

The tutorial trains a ResNet-50 on CIFAR-10; to run offline in seconds this one trains a small
CNN on tiny in-memory CIFAR-shaped data (32x32 RGB images whose class sets the colour of a
square), and otherwise keeps the tutorial's code: a ``BaseModel`` whose
``forward(imgs, labels, mode)`` returns ``{'loss': ...}`` or ``(scores, labels)``, its own
``Accuracy(BaseMetric)`` (``process`` / ``compute_metrics``), built ``DataLoader``s and::

    runner = Runner(model=..., work_dir=..., train_dataloader=...,
                    optim_wrapper=dict(optimizer=dict(type=SGD, lr=0.001, momentum=0.9)),
                    train_cfg=dict(by_epoch=True, max_epochs=5, val_interval=1),
                    val_dataloader=..., val_cfg=dict(), val_evaluator=dict(type=Accuracy))
    runner.train()

Run it: ``python -m scale_runner.examples.mmengine_tutorial [work_dir]``. The differences from
MMEngine that show here: checkpoints are directories (``work_dir/checkpoints/epoch_5``), and
the log's ``Epoch(val)`` line is followed by ``scalars.jsonl`` in the run directory.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import SGD
from torch.utils.data import DataLoader, Dataset

from scale_runner import (  # was: from mmengine.{model,evaluator,runner}
    BaseMetric,
    BaseModel,
    Runner,
)


class TinyCifar(Dataset):
    """``size`` (image, label) pairs of 3x32x32 noise with a class-coloured square."""

    def __init__(self, size: int = 256, num_classes: int = 10, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, num_classes, (size,), generator=g)
        palette = torch.rand(num_classes, 3, 1, 1, generator=torch.Generator().manual_seed(1234))
        self.images = 0.1 * torch.rand(size, 3, 32, 32, generator=g)
        self.images[:, :, 4:28, 4:28] += 2 * palette[self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


class MMSmallCNN(BaseModel):
    """The tutorial's ``MMResNet50`` with a small CNN inside."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes))

    def forward(self, imgs, labels, mode):
        x = self.net(imgs)
        if mode == 'loss':
            return {'loss': F.cross_entropy(x, labels)}
        elif mode == 'predict':
            return x, labels


class Accuracy(BaseMetric):
    def process(self, data_batch, data_samples):
        score, gt = data_samples
        self.results.append({'batch_size': len(gt),
                             'correct': (score.argmax(dim=1) == gt).sum().cpu()})

    def compute_metrics(self, results):
        total_correct = sum(item['correct'] for item in results)
        total_size = sum(item['batch_size'] for item in results)
        return dict(accuracy=100 * total_correct / total_size)


def main(work_dir: str = './work_dir/mmengine_tutorial', max_epochs: int = 5, **runner_args) -> dict:
    torch.manual_seed(0)
    train_dataloader = DataLoader(batch_size=32, shuffle=True, dataset=TinyCifar(512, seed=0))
    val_dataloader = DataLoader(batch_size=32, shuffle=False, dataset=TinyCifar(128, seed=1))
    runner = Runner(
        model=MMSmallCNN(),
        work_dir=work_dir,
        train_dataloader=train_dataloader,
        optim_wrapper=dict(optimizer=dict(type=SGD, lr=0.05, momentum=0.9)),  # tutorial: lr=0.001
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=1),
        val_dataloader=val_dataloader,
        val_cfg=dict(),
        val_evaluator=dict(type=Accuracy),
        **runner_args,
    )
    with runner:
        return runner.train()


if __name__ == '__main__':
    print(main(*sys.argv[1:2]))
