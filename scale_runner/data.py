"""Dataloaders from config: datasets, deterministic resumable samplers, collate functions."""
from __future__ import annotations

import functools
import random
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .errors import ConfigError
from .registry import DATA_SAMPLERS, DATASETS, FUNCTIONS, call_with_cfg

FUNCTIONS.register_module(name='default_collate', module=torch.utils.data.default_collate)


@FUNCTIONS.register_module()
def pseudo_collate(batch: list) -> list:
    """Keep the batch as a list of samples (for models that collate themselves)."""
    return list(batch)


@DATA_SAMPLERS.register_module()
class DefaultSampler(Sampler):
    """The global sample order, a pure function of ``(seed, epoch)``.

    Every rank builds the same order; Accelerate's ``prepare`` shards the batches across
    ranks. ``set_start(n)`` makes the next pass start after ``n`` samples without touching the
    skipped ones (used by exact resume).
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int | None = None):
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = 0 if seed is None else int(seed)
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, n: int) -> None:
        self._start = n

    def _order(self) -> list[int]:
        n = len(self.dataset)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return iter(self._order()[start:])

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'seed': self.seed, 'shuffle': self.shuffle}


@DATA_SAMPLERS.register_module()
class InfiniteSampler(DefaultSampler):
    """Yields epoch after epoch of ``DefaultSampler`` order (for iteration-based training)."""

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        self.epoch += start // len(self.dataset)
        start %= len(self.dataset)
        while True:
            yield from self._order()[start:]
            start = 0
            self.epoch += 1


def worker_init_fn(worker_id: int, rank: int) -> None:
    """Seed ``random``/``numpy`` in a worker from torch's per-worker seed and the rank.

    Torch derives the worker seed from the main process's RNG, which the runner seeds, so
    augmentation randomness is reproducible across runs and differs across ranks and workers.
    """
    worker_seed = (torch.initial_seed() + rank * 1_000_003) % 2**32
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)
    try:
        import numpy as np
        np.random.seed(worker_seed)
    except ImportError:  # numpy is optional
        pass


def build_dataloader(cfg: Any, *, seed: int = 0, rank: int = 0, where: str = 'dataloader') -> Any:
    """Build a ``DataLoader`` from ``dict(dataset=..., sampler=..., batch_size=..., ...)``.

    A built ``DataLoader`` (or any iterable) is returned unchanged.
    """
    if not isinstance(cfg, dict):
        return cfg
    cfg = dict(cfg)
    if 'dataset' not in cfg:
        raise ConfigError(f'{where}.dataset is missing: a dataloader config needs '
                          f"dataset=dict(type=...) (got keys {sorted(cfg)})")
    dataset = DATASETS.build(cfg.pop('dataset'), _cfg_path=f'{where}.dataset')
    sampler_cfg = cfg.pop('sampler', dict(type='DefaultSampler', shuffle=False))
    if isinstance(sampler_cfg, dict):
        sampler_cfg = dict(sampler_cfg)
        sampler_cfg.setdefault('type', 'DefaultSampler')
        if sampler_cfg.get('seed') is None and 'Sampler' in str(sampler_cfg['type']):
            sampler_cfg['seed'] = seed
        sampler = DATA_SAMPLERS.build(sampler_cfg, _cfg_path=f'{where}.sampler', dataset=dataset)
    else:
        sampler = sampler_cfg
    collate = _build_collate(cfg.pop('collate_fn', dict(type='default_collate')), f'{where}.collate_fn')
    if cfg.get('num_workers', 0) > 0:
        cfg.setdefault('worker_init_fn', functools.partial(worker_init_fn, rank=rank))
    else:
        cfg.pop('persistent_workers', None)
    return call_with_cfg(DataLoader, dict(dataset=dataset, sampler=sampler, collate_fn=collate, **cfg),
                         where)


def _build_collate(collate: Any, where: str) -> Any:
    """``collate_fn``: a callable, a registered/dotted name, or ``dict(type=..., **partial_kwargs)``."""
    if isinstance(collate, dict):
        collate = dict(collate)
        if 'type' not in collate:
            raise ConfigError(f'{where} needs a type, e.g. dict(type=\'default_collate\')')
        fn = _get_function(collate.pop('type'), f'{where}.type')
        return functools.partial(fn, **collate) if collate else fn
    if isinstance(collate, str):
        return _get_function(collate, where)
    if collate is not None and not callable(collate):
        raise ConfigError(f'{where} must be a callable, a registered name or dict(type=...), '
                          f'got {collate!r}')
    return collate


def _get_function(key: Any, where: str) -> Any:
    if callable(key):
        return key
    try:
        return FUNCTIONS.get(key)
    except KeyError as e:
        msg = e.args[0] if e.args else str(e)
        raise ConfigError(f'{where}: {msg}') from None


def get_sampler(dataloader) -> Any:
    """The index sampler behind a (possibly Accelerate-prepared) dataloader."""
    for obj in (dataloader, getattr(dataloader, 'base_dataloader', None)):
        if obj is None:
            continue
        bs = getattr(obj, 'batch_sampler', None)
        for cand in (getattr(obj, 'sampler', None), getattr(bs, 'sampler', None),
                     getattr(getattr(bs, 'batch_sampler', None), 'sampler', None)):
            if cand is not None and hasattr(cand, 'set_epoch'):
                return cand
    return None


def set_epoch(dataloader, epoch: int) -> None:
    """Set the epoch of a dataloader's sampler (and of an Accelerate-prepared loader, which calls
    ``set_epoch`` itself at every pass with its own count of passes: 0 after a resume)."""
    if callable(getattr(dataloader, 'set_epoch', None)):
        dataloader.set_epoch(epoch)
    sampler = get_sampler(dataloader)
    if sampler is not None:
        sampler.set_epoch(epoch)
