"""A two-spiral classification task: data generated in memory, an MLP classifier."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..model import BaseModel
from ..registry import DATASETS, MODELS


@DATASETS.register_module()
class SpiralDataset(torch.utils.data.Dataset):
    """``num_classes`` interleaved noisy spirals in 2-D; samples are ``dict(inputs, labels)``."""

    def __init__(self, size: int = 2000, num_classes: int = 3, noise: float = 0.2, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(size) % num_classes
        r = torch.rand(size, generator=g)
        theta = r * 3 * math.pi + labels * (2 * math.pi / num_classes)
        x = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=1)
        self.inputs = x + noise * r.unsqueeze(1) * torch.randn(size, 2, generator=g)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {'inputs': self.inputs[i], 'labels': self.labels[i]}


@MODELS.register_module()
class MLPClassifier(BaseModel):
    """An MLP with MMEngine's ``forward(inputs, labels, mode)`` contract."""

    def __init__(self, in_dim: int = 2, hidden: int = 64, depth: int = 2, num_classes: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        layers, d = [], in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout)]
            d = hidden
        layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, inputs, labels=None, mode: str = 'tensor'):
        logits = self.net(inputs)
        if mode == 'loss':
            return {'loss': nn.functional.cross_entropy(logits, labels)}
        if mode == 'predict':
            return {'logits': logits, 'labels': labels}
        return logits
