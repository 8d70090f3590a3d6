"""Streamed (iterable) datasets that resume exactly: ``HFDataset(..., streaming=True)``.

The pipeline of one reader (a rank, or one dataloader worker of a rank)::

    datasets' streaming reader (this reader's shards; ``map`` on the fly)
      -> packing (optional, ``pack=``: fixed-length blocks, remainder carried)
      -> tensors -> shuffle buffer (optional, ``shuffle=dict(buffer_size=...)``) -> collate

Every stage has a ``state_dict()`` of JSON values and tensors: the reader's shard and offset
(``datasets``' own ``IterableDataset.state_dict``), the packing remainder, the shuffle buffer's
examples and its RNG, the pass (epoch) count. ``torchdata``'s ``StatefulDataLoader`` collects
them from the workers every ``snapshot_every_n_steps`` batches (default 256, not every step) and replays at
most that many batches on resume; each rank's loader state goes into that rank's own checkpoint
file (``rank_state['data']``). A training stream never ends: a reader that reaches the end of
its shards starts its next pass (reshuffled: the buffer's RNG is reseeded from the run's seed
and the pass) and carries its buffer and remainder over, so ranks need no agreement on passes.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

INSTALL = "pip install 'scale_runner[datasets]'"
SNAPSHOT_EVERY = 256  # batches between worker-state snapshots: resume replays at most this many


# ---- stages ------------------------------------------------------------------------------------
class PackTokens:
    """Concatenate tokenized documents (each followed by ``eos_id``, if given) and cut blocks of
    ``block_size`` ids; the tail is carried into the next block. A streaming stage: call it on an
    iterator of examples; ``state_dict()`` holds the ids not yet emitted.

    Each block is ``{column: ids}`` plus ``{labels: ids}`` (the same ids: models shift), int64.
    """

    def __init__(self, block_size: int, eos_id: int | None = None, column: str = 'input_ids',
                 labels: str | None = 'labels'):
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ConfigError(f'pack.block_size = {block_size!r} is not valid: it takes an int >= 1, '
                              f'e.g. pack=dict(block_size=128)')
        self.block_size, self.eos_id, self.column, self.labels = block_size, eos_id, column, labels
        self._ids = np.zeros(0, dtype=np.int64)  # ids[pos:] are not emitted yet
        self._pos = 0

    def __call__(self, examples: Iterator[dict]) -> Iterator[dict]:
        bs, tail = self.block_size, ([] if self.eos_id is None else [self.eos_id])
        while True:
            # Blocks already complete go first, before the next document is read: a resumed
            # stage (whose state is these ids) then pulls its source exactly when the original did
            # (a pull can end a pass, which reseeds the shuffle buffer).
            while len(self._ids) - self._pos >= bs:
                block = self._ids[self._pos:self._pos + bs].copy()  # no view pinning the document
                self._pos += bs  # advanced before the yield: the state is "after this block"
                yield {self.column: block, self.labels: block} if self.labels else {self.column: block}
            example = next(examples, None)
            if example is None:
                return
            if self.column not in example:
                raise ConfigError(f'pack: the examples have no column {self.column!r} (they have '
                                  f'{sorted(example)}): set pack.column, or tokenize with map=')
            doc = example[self.column]
            doc = doc.numpy() if isinstance(doc, torch.Tensor) else np.asarray(doc, dtype=np.int64)
            self._ids = np.concatenate([self._ids[self._pos:], doc.astype(np.int64, copy=False),
                                        np.asarray(tail, dtype=np.int64)])
            self._pos = 0

    def state_dict(self) -> dict:
        return {'ids': torch.from_numpy(self._ids[self._pos:].copy())}

    def load_state_dict(self, state: dict) -> None:
        self._ids, self._pos = state['ids'].numpy().astype(np.int64, copy=True), 0


class ShuffleBuffer:
    """A buffer of ``buffer_size`` examples: each new one takes the place of a random one, which
    is emitted. Its RNG and examples are its state, so a resume continues the same order."""

    def __init__(self, buffer_size: int, seed: int):
        self.size, self.seed = buffer_size, seed
        self.items: list = []
        self.rng = random.Random(seed)

    def reseed(self, *values: int) -> None:
        from .data import _mix
        self.rng.seed(_mix(self.seed, *values))

    def push(self, item):
        """``item`` in, a random buffered one out (None while filling)."""
        if len(self.items) < self.size:
            self.items.append(item)
            return None
        i = self.rng.randrange(self.size)
        out, self.items[i] = self.items[i], item
        return out

    def drain(self) -> Iterator:
        while self.items:
            i = self.rng.randrange(len(self.items))
            self.items[i], self.items[-1] = self.items[-1], self.items[i]
            yield self.items.pop()

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {'rng': [version, list(internal), gauss], 'items': _stack(self.items)}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state['rng']
        self.rng.setstate((version, tuple(internal), gauss))
        self.items = _unstack(state['items'])


def _stack(items: list) -> dict:
    """Buffered examples as checkpoint values: one tensor per column when they stack (the usual
    case, one safetensors entry each), else the list itself (tensors, numbers, strings)."""
    if not items:
        return {'list': []}
    keys = list(items[0]) if isinstance(items[0], dict) else None
    if keys and all(isinstance(it, dict) and list(it) == keys for it in items) and all(
            isinstance(items[0][k], torch.Tensor) for k in keys):
        # a column that is another one in every example (packing's labels = input_ids): once
        same: dict = {}
        for i, k in enumerate(keys):
            a = next((a for a in keys[:i] if a not in same and all(it[k] is it[a] for it in items)),
                     None)
            if a is not None:
                same[k] = a
        try:
            return {'columns': {k: torch.stack([it[k] for it in items]) for k in keys if k not in same},
                    'same': same, 'keys': keys}
        except RuntimeError:  # shapes or dtypes differ
            pass
    return {'list': list(items)}


def _unstack(doc: dict) -> list:
    if 'columns' not in doc:
        return list(doc['list'])
    cols, same = doc['columns'], doc.get('same', {})
    n = len(next(iter(cols.values())))
    rows = [{k: v[i] for k, v in cols.items()} for i in range(n)]
    for row in rows:
        row.update((k, row[a]) for k, a in same.items())
    keys = doc.get('keys') or list(rows[0]) if rows else []
    return [{k: row[k] for k in keys} for row in rows]


def _tensors(example: dict) -> dict:
    """Numeric arrays and lists as tensors (``format='torch'``); other values as they are."""
    out, done = {}, {}
    for k, v in example.items():
        if id(v) in done:  # one array under two names (labels = input_ids) stays one tensor
            out[k] = done[id(v)]
            continue
        t = v
        if isinstance(v, np.ndarray) and v.dtype.kind in 'biuf':
            t = torch.from_numpy(v)
        elif isinstance(v, list) and v and isinstance(v[0], (int, float)) and not isinstance(v[0], bool):
            t = torch.tensor(v)
        out[k] = done[id(v)] = t
    return out


# ---- the dataset -------------------------------------------------------------------------------
class StreamDataset(torch.utils.data.IterableDataset):
    """A streamed ``datasets.IterableDataset`` (``map`` applied on the fly) as a resumable torch
    iterable dataset. Built by ``HFDataset(..., streaming=True)``; the dataloader builder calls
    :meth:`setup` with the rank, world size and workers before the first pass.

    Args:
        source: the ``datasets.IterableDataset`` (already mapped / renamed / column-selected).
        pack: a packing stage config (``dict(block_size=128, eos_id=...)``, ``type`` defaults to
            ``'pack_tokens'``; any ``FUNCTIONS`` class with the same protocol), or None.
        shuffle: ``dict(buffer_size=..., seed=None)`` (None: the run's seed), or None.
        format: ``'torch'`` (numeric columns become tensors) or None.
        cycle: whether the stream restarts at its end (None: for a train dataloader).
    """

    def __init__(self, source, pack: Any = None, shuffle: Any = None, format: str | None = 'torch',
                 cycle: bool | None = None, name: str = 'stream'):
        self.source, self.format, self.cycle, self.name = source, format, cycle, name
        self.pack_cfg = _pack_cfg(pack)
        self.shuffle_cfg = _shuffle_cfg(shuffle)
        self.reader = {'rank': 0, 'world_size': 1, 'num_workers': 0}
        self.seed = 0
        self._src = source  # this rank's part, once set up
        self._start: dict | None = None  # a state to resume from (load_state_dict)
        self._live: _Reader | None = None

    @property
    def num_shards(self) -> int:
        return int(self.source.num_shards)

    def setup(self, rank: int, world_size: int, num_workers: int, seed: int, cycle: bool,
              where: str = 'dataloader') -> None:
        """Split the shards across ranks (``split_dataset_by_node``; across workers ``datasets``
        splits them itself) after checking they divide evenly."""
        readers = world_size * max(num_workers, 1)
        if self.num_shards % readers:
            raise ConfigError(
                f'{where}.dataset.data_files: the stream has {self.num_shards} shard(s) (files), which '
                f'do not divide across {world_size} process(es) x {max(num_workers, 1)} reader(s) per '
                f'process (num_workers={num_workers}) = {readers} readers: every reader needs the same '
                f'number of whole shards. Split the data into a multiple of {readers} files, or set '
                f'{where}.num_workers so that processes x workers divides {self.num_shards}')
        self.reader = {'rank': rank, 'world_size': world_size, 'num_workers': num_workers}
        if self.shuffle_cfg is not None and self.shuffle_cfg.get('seed') is None:
            self.shuffle_cfg['seed'] = seed
        self.seed = int(seed)
        if self.cycle is None:
            self.cycle = cycle
        self._src = self.source
        if world_size > 1:
            from datasets.distributed import split_dataset_by_node
            self._src = split_dataset_by_node(self.source, rank=rank, world_size=world_size)

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        reader = _Reader(self, 0 if info is None else info.id)
        if self._start is not None:
            reader.load_state_dict(self._start)
        self._live = reader
        return iter(reader)

    def state_dict(self) -> dict:
        if self._live is not None:
            return self._live.state_dict()
        return self._start if self._start is not None else {'reader': dict(self.reader)}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get('reader', {})
        for key in ('world_size', 'num_workers', 'rank'):
            if key in saved and saved[key] != self.reader[key]:
                raise ConfigError(
                    f'the saved position of the stream {self.name!r} was read with {key}='
                    f'{saved[key]} but this run has {key}={self.reader[key]}: a stream position '
                    f'belongs to its reader (shards, shuffle buffer, packing remainder); resume '
                    f'with the same processes and train_dataloader.num_workers')
        self._start, self._live = (state if 'epoch' in state else None), None

    def __repr__(self) -> str:
        return (f'StreamDataset({self.name!r}, {self.num_shards} shard(s), pack={self.pack_cfg}, '
                f'shuffle={self.shuffle_cfg})')


def _pack_cfg(pack: Any) -> dict | None:
    if pack is None:
        return None
    if not isinstance(pack, dict):
        raise ConfigError(f'dataset.pack = {pack!r} is not valid: give dict(block_size=..., '
                          f'eos_id=...) (type defaults to pack_tokens)')
    return dict(pack)


def _shuffle_cfg(shuffle: Any) -> dict | None:
    if shuffle is None or shuffle is False:
        return None
    if not isinstance(shuffle, dict) or set(shuffle) - {'buffer_size', 'seed'}:
        raise ConfigError(f'dataset.shuffle = {shuffle!r} is not valid for a stream: give '
                          f'dict(buffer_size=10000, seed=None) (seed None: the run\'s seed)')
    size = shuffle.get('buffer_size')
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ConfigError(f'dataset.shuffle.buffer_size = {size!r} is not valid: it takes an int '
                          f'>= 1, e.g. shuffle=dict(buffer_size=10000)')
    return dict(shuffle)


class _Reader:
    """One reader's live pipeline (in a dataloader worker, or in the main process)."""

    def __init__(self, ds: StreamDataset, worker: int):
        self.ds, self.worker = ds, worker
        self.epoch = 0
        self.source_state: dict | None = None  # where the current pass resumes
        self._reading = False  # the source has yielded in this pass: its live state is current
        self.pack = None
        if ds.pack_cfg is not None:
            cfg = dict(ds.pack_cfg)
            from .data import resolve_function
            make = resolve_function(cfg.pop('type', 'pack_tokens'), 'dataset.pack.type')
            self.pack = make(**cfg)
        self.buffer = None
        if ds.shuffle_cfg is not None:
            self.buffer = ShuffleBuffer(ds.shuffle_cfg['buffer_size'], int(ds.shuffle_cfg['seed']))
            self._reseed()

    def _reseed(self) -> None:
        r = self.ds.reader
        self.buffer.reseed(self.epoch, r['rank'], self.worker)

    def _examples(self) -> Iterator[dict]:
        """This reader's source examples, pass after pass (one pass unless cycling)."""
        src = self.ds._src
        while True:
            # {} (falsy) makes ``datasets`` start the pass from the beginning: a loaded state
            # would otherwise apply to every later pass too.
            src.load_state_dict(self.source_state or {})
            self._reading = False
            seen = False
            for example in src:
                self._reading = seen = True
                yield example
            if not seen and not self.source_state:
                raise ConfigError(f'the stream {self.ds.name!r} has no examples for reader '
                                  f'{self.ds.reader["rank"]}/{self.worker}: check data_files')
            if not self.ds.cycle:
                return
            self.epoch += 1
            self.source_state, self._reading = None, False
            if self.buffer is not None:
                self._reseed()

    def __iter__(self) -> Iterator[dict]:
        stream = self._examples()
        if self.pack is not None:
            stream = self.pack(stream)
        if self.ds.format == 'torch':
            stream = map(_tensors, stream)
        if self.buffer is None:
            yield from stream
            return
        push = self.buffer.push
        for example in stream:
            out = push(example)
            if out is not None:
                yield out
        yield from self.buffer.drain()  # a finite stream's end

    def state_dict(self) -> dict:
        src = self.ds._src.state_dict() if self._reading else self.source_state
        state = {'reader': dict(self.ds.reader, worker=self.worker), 'epoch': self.epoch,
                 'source': src}
        if self.pack is not None:
            state['pack'] = self.pack.state_dict()
        if self.buffer is not None:
            state['shuffle'] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state['epoch'])
        self.source_state = state.get('source')
        if self.pack is not None and 'pack' in state:
            self.pack.load_state_dict(state['pack'])
        if self.buffer is not None and 'shuffle' in state:
            self.buffer.load_state_dict(state['shuffle'])


# ---- the loader ----------------------------------------------------------------------------------
class StreamLoader:
    """A ``torchdata`` ``StatefulDataLoader`` over a :class:`StreamDataset`: what the loops
    iterate and the checkpoint asks for ``state_dict()``. Not a ``DataLoader`` itself, so
    Accelerate leaves it alone (the ranks' split is the dataset's); batches go to ``device``."""

    def __init__(self, loader, device=None, world_size: int = 1):
        self.loader, self.dataset, self.device = loader, loader.dataset, device
        self.batch_size = loader.batch_size
        self.total_batch_size = (loader.batch_size or 1) * world_size
        self.restored = False

    def __iter__(self):
        if self.device is None:
            return iter(self.loader)
        from accelerate.utils import send_to_device
        return (send_to_device(batch, self.device) for batch in self.loader)

    def state_dict(self) -> dict:
        return {'loader': self.loader.state_dict(), 'batch_size': self.batch_size,
                'reader': dict(self.dataset.reader)}

    def load_state_dict(self, state: dict, where: str = 'checkpoint') -> None:
        saved = state.get('reader', {})
        now = self.dataset.reader
        for key, what in (('world_size', 'processes'), ('num_workers', 'train_dataloader.num_workers')):
            if saved.get(key, now[key]) != now[key]:
                from .checkpoint.format import CheckpointError
                raise CheckpointError(
                    f'{where}: the streamed train data was read with {saved[key]} {what}, this '
                    f'run has {now[key]}: each reader\'s position (shards, offset, shuffle buffer, '
                    f'packing remainder) cannot be re-split; resume with the same setup')
        if state.get('batch_size', self.batch_size) != self.batch_size:
            from .checkpoint.format import CheckpointError
            raise CheckpointError(f'{where}: the streamed train data was batched by '
                                  f'{state["batch_size"]}, this run by {self.batch_size}: resume '
                                  f'with the same train_dataloader.batch_size')
        self.loader.load_state_dict(state['loader'])
        self.restored = True

    def __repr__(self) -> str:
        return f'StreamLoader({self.dataset!r}, batch_size={self.batch_size})'


def is_stream(loader) -> bool:
    return isinstance(loader, StreamLoader)


def build_stream_loader(dataset: StreamDataset, cfg: dict, *, seed: int, rank: int,
                        where: str, generator=None, worker_init_fn=None) -> StreamLoader:
    """The loader of a streamed dataset from the rest of a dataloader config (``batch_size``,
    ``num_workers``, ``collate_fn`` resolved, ``snapshot_every_n_steps``, ...)."""
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader
    except ImportError as e:
        raise ImportError(f'a streamed dataset (streaming=True) needs torchdata: {INSTALL}') from e
    world, device = _world()
    cfg = dict(cfg)
    workers = int(cfg.get('num_workers', 0) or 0)
    dataset.setup(rank, world, workers, seed, cycle=where == 'train_dataloader', where=where)
    every = cfg.pop('snapshot_every_n_steps', SNAPSHOT_EVERY)
    if workers and worker_init_fn is not None:
        cfg.setdefault('worker_init_fn', worker_init_fn)
    if generator is not None:
        cfg.setdefault('generator', generator)
    import warnings
    with warnings.catch_warnings():  # torchdata 0.11 calls the deprecated torch.set_vital
        warnings.filterwarnings('ignore', message=".*'set_vital' is deprecated")
        loader = StatefulDataLoader(dataset, snapshot_every_n_steps=every, **cfg)
    return StreamLoader(loader, device, world)


def _world() -> tuple[int, Any]:
    """(processes, device to move batches to or None on CPU) from Accelerate's state, if set up."""
    from accelerate.state import PartialState
    if not PartialState._shared_state:
        return 1, None
    state = PartialState()
    return state.num_processes, (state.device if state.device.type != 'cpu' else None)


# ---- checkpoint state (called by checkpoint/state.py) ------------------------------------------
def loader_state(runner) -> dict | None:
    """This rank's stream position, if the train data is streamed (else None)."""
    loader = getattr(runner.train_loop, 'dataloader', None)
    return loader.state_dict() if is_stream(loader) else None


def restore_loader(runner, ckpt: dict, change: str | None) -> None:
    """Give the train stream this rank's saved position; refuse another setup (the readers'
    positions cannot be re-split without repeating or skipping data)."""
    loader = getattr(runner.train_loop, 'dataloader', None)
    if not is_stream(loader):
        return
    from .checkpoint.format import CheckpointError
    if change:
        raise CheckpointError(
            f'{ckpt["path"]} cannot be resumed with a different setup ({change}): the train data '
            f'is streamed, and each rank\'s position (its shards, offsets, shuffle buffer and '
            f'packing remainder) cannot be re-split across another number of processes without '
            f'repeating or skipping data. Resume with the original number of processes and '
            f'batch size, or start a new run from its weights with load_from={ckpt["path"]!r}')
    state = ckpt['rank'].get('data')
    if state is not None:
        loader.load_state_dict(state, where=ckpt['path'])
