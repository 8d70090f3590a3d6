"""MMEngine's data preprocessors: ``BaseModel.data_preprocessor`` moves (and casts) a batch.

``BaseDataPreprocessor(data, training)`` moves every tensor of the batch (dicts, lists,
tuples, named tuples, objects with ``.to``) to the model's device. ``ImgDataPreprocessor``
also turns ``inputs`` (a batch tensor ``N, C, H, W`` or a list of ``C, H, W`` tensors) into a
float batch: channels flipped (``bgr_to_rgb`` / ``rgb_to_bgr``), normalized with ``mean`` /
``std`` and padded to a multiple of ``pad_size_divisor``; it returns
``dict(inputs=..., data_samples=...)``. A ``(inputs, labels)`` tuple batch keeps its form
with the inputs processed (MMEngine takes only dicts).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .registry import MODELS


@MODELS.register_module()
class BaseDataPreprocessor(nn.Module):
    def __init__(self, non_blocking: bool = False):
        super().__init__()
        self._non_blocking = non_blocking
        # follows the model through .to()/.cuda()/accelerate.prepare: the device to move to
        self.register_buffer('_device_marker', torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_marker.device

    def cast_data(self, data: Any) -> Any:
        device = self._device_marker.device
        return _move(data, device, self._non_blocking)

    def forward(self, data: Any, training: bool = False) -> Any:
        return self.cast_data(data)


def _move(data: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(data, torch.Tensor):
        return data if data.device == device else data.to(device, non_blocking=non_blocking)
    if isinstance(data, dict):
        moved = {k: _move(v, device, non_blocking) for k, v in data.items()}
        return moved if type(data) is dict else type(data)(moved)
    if isinstance(data, tuple) and hasattr(data, '_fields'):  # a named tuple
        return type(data)(*(_move(v, device, non_blocking) for v in data))
    if isinstance(data, (list, tuple)):
        return type(data)(_move(v, device, non_blocking) for v in data)
    if hasattr(data, 'to') and not isinstance(data, (str, bytes)):  # a data sample
        return data.to(device)
    return data


@MODELS.register_module()
class ImgDataPreprocessor(BaseDataPreprocessor):
    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 pad_size_divisor: int = 1, pad_value: float = 0, bgr_to_rgb: bool = False,
                 rgb_to_bgr: bool = False, non_blocking: bool = False):
        super().__init__(non_blocking)
        where = 'model.data_preprocessor'
        if bgr_to_rgb and rgb_to_bgr:
            raise ConfigError(f'{where}: bgr_to_rgb and rgb_to_bgr cannot both be True')
        if (mean is None) != (std is None):
            raise ConfigError(f'{where}: give mean and std together (or neither), got '
                              f'mean={mean!r}, std={std!r}')
        if not isinstance(pad_size_divisor, int) or pad_size_divisor < 1:
            raise ConfigError(f'{where}.pad_size_divisor = {pad_size_divisor!r} is not valid: it '
                              f'takes a positive int')
        self._enable_normalize = mean is not None
        if mean is not None:
            mean, std = _channels(mean, f'{where}.mean'), _channels(std, f'{where}.std')
            if len(mean) != len(std) or any(s == 0 for s in std):
                raise ConfigError(f'{where}: mean and std need the same length (1 or the channel '
                                  f'count) and no zero std, got mean={mean}, std={std}')
            self.register_buffer('mean', torch.tensor(mean).view(-1, 1, 1), persistent=False)
            self.register_buffer('std', torch.tensor(std).view(-1, 1, 1), persistent=False)
        self.pad_size_divisor = pad_size_divisor
        self.pad_value = pad_value
        self._channel_conversion = bgr_to_rgb or rgb_to_bgr

    def _one(self, img: torch.Tensor) -> torch.Tensor:
        """One ``C, H, W`` image or an ``N, C, H, W`` batch, as floats."""
        if self._channel_conversion and img.shape[-3] == 3:
            img = img.flip(-3)
        img = img.float()
        if self._enable_normalize:
            if self.mean.shape[0] not in (1, img.shape[-3]):
                raise ConfigError(f'model.data_preprocessor: mean has {self.mean.shape[0]} values '
                                  f'but the images have {img.shape[-3]} channels')
            img = (img - self.mean) / self.std
        return img

    def _batch(self, inputs: Any) -> torch.Tensor:
        if isinstance(inputs, torch.Tensor):
            if inputs.dim() != 4:
                raise ConfigError(f'ImgDataPreprocessor: inputs must be N, C, H, W or a list of '
                                  f'C, H, W tensors, got a tensor of shape {tuple(inputs.shape)}')
            return self._pad(self._one(inputs))
        if isinstance(inputs, (list, tuple)) and inputs and all(
                isinstance(t, torch.Tensor) and t.dim() == 3 for t in inputs):
            imgs = [self._one(t) for t in inputs]
            h = max(t.shape[-2] for t in imgs)
            w = max(t.shape[-1] for t in imgs)
            d = self.pad_size_divisor
            h, w = math.ceil(h / d) * d, math.ceil(w / d) * d
            return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]),
                                      value=self.pad_value) for t in imgs])
        raise ConfigError(f'ImgDataPreprocessor: inputs must be an N, C, H, W tensor or a list of '
                          f'C, H, W tensors, got {type(inputs).__name__}')

    def _pad(self, batch: torch.Tensor) -> torch.Tensor:
        d = self.pad_size_divisor
        h, w = batch.shape[-2:]
        ph, pw = math.ceil(h / d) * d - h, math.ceil(w / d) * d - w
        return F.pad(batch, (0, pw, 0, ph), value=self.pad_value) if ph or pw else batch

    def forward(self, data: Any, training: bool = False) -> Any:
        data = self.cast_data(data)
        if isinstance(data, dict):
            if 'inputs' not in data:
                raise ConfigError(f"ImgDataPreprocessor: the batch has no 'inputs' key (keys: "
                                  f'{sorted(data)}); give dict(inputs=..., data_samples=...)')
            return {'inputs': self._batch(data['inputs']), 'data_samples': data.get('data_samples')}
        if isinstance(data, (list, tuple)) and data:
            return type(data)([self._batch(data[0]), *data[1:]])
        return self._batch(data)


def _channels(values: Any, where: str) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)]
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ConfigError(f'{where} = {values!r} is not valid: it takes a number per channel, '
                          f'e.g. [123.675, 116.28, 103.53]') from None


def build_data_preprocessor(cfg: Any) -> nn.Module:
    """``BaseModel(data_preprocessor=...)``: None (``BaseDataPreprocessor``), a config dict
    (``type`` defaults to ``BaseDataPreprocessor``) or a module."""
    if cfg is None:
        return BaseDataPreprocessor()
    if isinstance(cfg, nn.Module):
        return cfg
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        cfg.setdefault('type', 'BaseDataPreprocessor')
        return MODELS.build(cfg, _cfg_path='model.data_preprocessor')
    raise ConfigError(f"model.data_preprocessor = {cfg!r} is not valid: it takes "
                      f"dict(type='ImgDataPreprocessor', mean=..., std=...), a module or None")
