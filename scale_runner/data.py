"""Dataloaders from config: datasets, deterministic resumable samplers, collate functions."""
from __future__ import annotations

import functools
import inspect
import itertools
import random
import sys
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .checks import check_against_defaults, check_dataloader_args, check_sampler_args
from .errors import ConfigError, did_you_mean
from .registry import DATA_SAMPLERS, DATASETS, FUNCTIONS, _binding_message, call_with_cfg

_PIECE = 4096  # indices converted to Python ints at a time (a shuffled order)

FUNCTIONS.register_module(name='default_collate', module=torch.utils.data.default_collate)


@FUNCTIONS.register_module()
def pseudo_collate(batch: list) -> list:
    """Keep the batch as a list of samples (for models that collate themselves)."""
    return list(batch)


@FUNCTIONS.register_module()
def pack_tokens(block_size: int, eos_id: int | None = None, column: str = 'input_ids',
                labels: str | None = 'labels'):
    """A streaming packing stage (:class:`~scale_runner.streaming.PackTokens`): tokenized
    documents concatenated (``eos_id`` after each) and cut into ``block_size`` blocks, the
    remainder carried to the next. ``HFDataset(..., streaming=True, pack=dict(block_size=...))``."""
    from .streaming import PackTokens
    return PackTokens(block_size, eos_id=eos_id, column=column, labels=labels)


@DATA_SAMPLERS.register_module()
class DefaultSampler(Sampler):
    """The global sample order, a pure function of ``(seed, epoch)``.

    Every rank builds the same order; Accelerate's ``prepare`` shards the batches across
    ranks. ``set_start(n)`` makes the next pass start after ``n`` samples without touching the
    skipped ones (used by exact resume). MMEngine's ``round_up`` (pad so every rank gets as
    many samples) is Accelerate's ``even_batches`` here, on by default.
    """

    def __init__(self, dataset, shuffle: bool = True, seed: int | None = None, round_up: bool = True):
        if not round_up:
            raise ConfigError('sampler.round_up=False: padding is done by Accelerate here; set '
                              'accelerator=dict(dataloader_config=dict(even_batches=False)) instead')
        self.dataset = dataset
        self.shuffle = shuffle
        self.seed = 0 if seed is None else int(seed)
        self.epoch = 0
        self._start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, n: int) -> None:
        self._start = n

    def _indices(self, start: int) -> Iterator[int]:
        """This epoch's order from position ``start``, made lazily: no list of the whole dataset
        is built when a pass begins (that stalled each epoch start by ~25 ms per 320k samples)."""
        n = len(self.dataset)
        if not self.shuffle:
            return iter(range(start, n))
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        perm = torch.randperm(n, generator=g)[start:]
        # C-level iteration (no generator frame per index); a piece becomes a list when reached.
        return itertools.chain.from_iterable(map(torch.Tensor.tolist, perm.split(_PIECE)))

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return self._indices(start)

    def __len__(self) -> int:
        return len(self.dataset)

    def state_dict(self) -> dict:
        return {'epoch': self.epoch, 'seed': self.seed, 'shuffle': self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Restore the epoch; a different seed or shuffle would give another order: an error."""
        for key in ('seed', 'shuffle'):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f'sampler {key} differs from the saved one ({getattr(self, key)!r} '
                                 f'vs {state[key]!r}): the data order would not be the same')
        self.epoch = int(state.get('epoch', self.epoch))


@DATA_SAMPLERS.register_module()
class InfiniteSampler(DefaultSampler):
    """Yields epoch after epoch of ``DefaultSampler`` order (for iteration-based training)."""

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        self.epoch += start // len(self.dataset)
        start %= len(self.dataset)

        def passes():
            nonlocal start
            while True:
                yield self._indices(start)
                start = 0
                self.epoch += 1  # asked for only once the previous pass is exhausted
        return itertools.chain.from_iterable(passes())


class LoaderGenerator(torch.Generator):
    """A dataloader's own generator, reseeded from ``(seed, epoch)`` at every pass.

    ``DataLoader`` draws its workers' base seed from ``loader.generator`` each time an iterator
    is created, and from the *global* torch RNG when there is none: a resumed run would then
    draw once more than the original and its dropout stream would diverge. With this generator
    the global RNG is never touched by iterator creation, and the base seed (hence every
    worker's seed) is a pure function of ``(seed, epoch)``.
    """

    def __new__(cls, seed: int = 0):
        return super().__new__(cls, 'cpu')  # torch.Generator's argument is the device

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = int(seed)
        self.reseed(0)

    def reseed(self, epoch: int) -> None:
        self.manual_seed(_mix(self.seed, epoch))


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 over the values): no collisions from sums."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def worker_init_fn(worker_id: int, rank: int) -> None:
    """Seed ``random``/``numpy``/``torch`` in a worker from ``(seed, epoch, rank, worker)``.

    Torch gives worker ``i`` the seed ``base_seed + i``, where ``base_seed`` is drawn from the
    loader's :class:`LoaderGenerator` (reseeded from ``(seed, epoch)`` at every pass); mixing
    in the rank makes ranks differ. So worker randomness is reproducible across runs and
    across a resume, and differs across epochs, ranks and workers.
    """
    worker_seed = _mix(torch.initial_seed(), rank, worker_id)
    random.seed(worker_seed)
    torch.manual_seed(worker_seed)
    try:
        import numpy as np
        np.random.seed(worker_seed % 2**32)
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
        near = did_you_mean('dataset', [k for k in cfg if isinstance(k, str)])
        hint = f'; {where}.{near} is not a key: did you mean {where}.dataset?' if near else ''
        raise ConfigError(f'{where}.dataset is missing: a dataloader config needs '
                          f"dataset=dict(type=...) (got keys {sorted(cfg)}){hint}")
    streamed = _streamed(cfg['dataset'])
    snapshot = cfg.pop('snapshot_every_n_steps', None) if streamed else None
    if streamed:
        _check_stream_loader(cfg, where)
    _check_loader_keys(cfg, where)  # misspelt keys and bad values, before the dataset is built
    sampler_cfg = None if streamed else cfg.get('sampler', dict(type='DefaultSampler', shuffle=False))
    check_dataloader_args(cfg, where, has_sampler=sampler_cfg is not None)
    if isinstance(sampler_cfg, dict):
        check_sampler_args(sampler_cfg, f'{where}.sampler')
    dataset = DATASETS.build(cfg.pop('dataset'), _cfg_path=f'{where}.dataset')
    if isinstance(dataset, torch.utils.data.IterableDataset):
        if not streamed:  # a dataset built from a config that did not say streaming=True
            _check_stream_loader(cfg, where)
            sampler_cfg = None
        if _streamed(dataset):
            return _stream_loader(dataset, cfg, seed, rank, where, snapshot)
    cfg.pop('sampler', None)
    if isinstance(sampler_cfg, dict):
        sampler_cfg = dict(sampler_cfg)
        sampler_cfg.setdefault('type', 'DefaultSampler')
        if sampler_cfg.get('seed') is None and 'Sampler' in str(sampler_cfg['type']):
            sampler_cfg['seed'] = seed
        sampler = DATA_SAMPLERS.build(sampler_cfg, _cfg_path=f'{where}.sampler', dataset=dataset)
    else:
        sampler = sampler_cfg
    collate = cfg.pop('collate_fn', dict(type='default_collate'))
    if collate is not None:
        collate = resolve_function(collate, f'{where}.collate_fn')
    # The loader's own generator: creating an iterator must not draw from the global RNG.
    cfg.setdefault('generator', LoaderGenerator(seed))
    if cfg.get('num_workers', 0) > 0:
        cfg.setdefault('worker_init_fn', functools.partial(worker_init_fn, rank=rank))
    else:
        cfg.pop('persistent_workers', None)
    return call_with_cfg(DataLoader, dict(dataset=dataset, sampler=sampler, collate_fn=collate, **cfg),
                         where, check=_check_loader_values, wrap_errors=True,
                         # built here (from the user's sampler/collate_fn configs) or by the runner
                         internal_keys=('dataset', 'sampler', 'collate_fn', 'generator',
                                        'worker_init_fn'))


def streaming():
    """``scale_runner.streaming`` once a stream was built, else None: a run without one never
    imports it (nor numpy and torchdata with it)."""
    return sys.modules.get('scale_runner.streaming')


def _streamed(dataset: Any) -> bool:
    """A ``streaming=True`` dataset config, or a built stream (``scale_runner.streaming``)."""
    if isinstance(dataset, dict):
        return bool(dataset.get('streaming'))
    stream = streaming()
    return stream is not None and isinstance(dataset, stream.StreamDataset)


def _check_stream_loader(cfg: dict, where: str) -> None:
    """What an iterable dataset's loader cannot take: a sampler (no indices), shuffle=True."""
    if cfg.get('sampler') is not None:
        raise ConfigError(f'{where}.sampler: the dataset is iterable (streaming=True): it has no '
                          f'indices to sample, and each rank and worker reads its own shards. '
                          f'Remove {where}.sampler; shuffle with '
                          f'{where}.dataset.shuffle=dict(buffer_size=10000)')
    cfg.pop('sampler', None)
    if cfg.get('shuffle'):
        raise ConfigError(f'{where}.shuffle = {cfg["shuffle"]!r}: an iterable (streaming=True) '
                          f'dataset is shuffled by a buffer: remove it and set '
                          f'{where}.dataset.shuffle=dict(buffer_size=10000)')


def _stream_loader(dataset, cfg: dict, seed: int, rank: int, where: str, snapshot) -> Any:
    from .streaming import build_stream_loader
    collate = cfg.pop('collate_fn', dict(type='default_collate'))
    if collate is not None:
        cfg['collate_fn'] = resolve_function(collate, f'{where}.collate_fn')
    if not cfg.get('num_workers'):
        cfg.pop('persistent_workers', None)
    if snapshot is not None:
        cfg['snapshot_every_n_steps'] = snapshot
    try:
        return build_stream_loader(dataset, cfg, seed=seed, rank=rank, where=where,
                                   generator=LoaderGenerator(seed),
                                   worker_init_fn=functools.partial(worker_init_fn, rank=rank))
    except (TypeError, ValueError) as e:
        raise ConfigError(f'{where}: {e}') from e


def _check_loader_keys(cfg: dict, where: str) -> None:
    """Every key of a dataloader section is a ``DataLoader`` parameter (or sampler/collate_fn)."""
    sig = inspect.signature(DataLoader)
    kwargs = dict(cfg, dataset=None)
    try:
        sig.bind(**kwargs)
    except TypeError as e:
        raise ConfigError(_binding_message(sig, kwargs, where, DataLoader, e)) from None


def _check_loader_values(obj, kwargs: dict, where: str) -> None:
    # batch_size=None (no batching) is valid: check_dataloader_args checked it already
    check_against_defaults(obj, {k: v for k, v in kwargs.items() if k != 'batch_size'}, where)


def resolve_function(fn: Any, where: str) -> Any:
    """A function from config: a callable, a FUNCTIONS name or dotted path, or
    ``dict(type=..., **kwargs)`` (the kwargs are bound with ``functools.partial``)."""
    if isinstance(fn, dict):
        fn = dict(fn)
        if 'type' not in fn:
            raise ConfigError(f"{where} needs a type naming a function, e.g. dict(type='default_collate')")
        base = resolve_function(fn.pop('type'), f'{where}.type')
        return functools.partial(base, **fn) if fn else base
    if isinstance(fn, str):
        try:
            return FUNCTIONS.get(fn)
        except KeyError as e:
            raise ConfigError(f'{where}: {e.args[0] if e.args else e}') from None
    if not callable(fn):
        raise ConfigError(f'{where} must be a callable, a registered name or dict(type=...), '
                          f'got {fn!r}')
    return fn


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
    ``set_epoch`` itself at every pass with its own count of passes: 0 after a resume), and
    reseed its :class:`LoaderGenerator` from ``(seed, epoch)``."""
    if callable(getattr(dataloader, 'set_epoch', None)):
        dataloader.set_epoch(epoch)
    generator = getattr(dataloader, 'generator', None)  # a prepared loader delegates to its base
    if isinstance(generator, LoaderGenerator):
        generator.reseed(epoch)
    sampler = get_sampler(dataloader)
    if sampler is not None:
        sampler.set_epoch(epoch)
