"""Handwritten digits (scikit-learn's bundled ``load_digits``: 1,797 8x8 images, no download)
and a small CNN classifier. ``pip install 'scale_runner[sklearn]'``."""
from __future__ import annotations

import torch
from torch import nn

from ..model import BaseModel
from ..registry import DATASETS, MODELS


@DATASETS.register_module()
class DigitsDataset(torch.utils.data.Dataset):
    """``split='train'`` or ``'val'``: a fixed, seeded, stratification-free split of
    ``sklearn.datasets.load_digits``; samples are ``dict(inputs=(1, 8, 8) in [0, 1], labels)``."""

    def __init__(self, split: str = 'train', val_fraction: float = 0.2, seed: int = 0):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise ImportError("DigitsDataset needs scikit-learn: pip install 'scale_runner[sklearn]'") from e
        if split not in ('train', 'val'):
            raise ValueError(f"DigitsDataset: split must be 'train' or 'val', got {split!r}")
        data = load_digits()
        images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
        labels = torch.as_tensor(data.target, dtype=torch.long)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_val = int(round(len(labels) * val_fraction))
        idx = order[:n_val] if split == 'val' else order[n_val:]
        self.inputs, self.labels = images[idx], labels[idx]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {'inputs': self.inputs[i], 'labels': self.labels[i]}


@MODELS.register_module()
class DigitsCNN(BaseModel):
    """Two 3x3 conv layers, a max-pool and a linear head; MMEngine's ``forward(..., mode)``."""

    def __init__(self, channels: int = 32, num_classes: int = 10, dropout: float = 0.1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(2 * channels * 16, num_classes)

    def forward(self, inputs, labels=None, mode: str = 'tensor'):
        logits = self.head(self.features(inputs))
        if mode == 'loss':
            return {'loss': nn.functional.cross_entropy(logits, labels)}
        if mode == 'predict':
            out = {'logits': logits, 'labels': labels}
            if labels is not None:  # per-sample losses: the loops report val_loss
                out['loss'] = nn.functional.cross_entropy(logits, labels, reduction='none')
            return out
        return logits
