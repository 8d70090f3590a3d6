"""``HFDataset``: a Hugging Face ``datasets`` dataset as a map-style torch dataset.

``datasets`` is imported only when an ``HFDataset`` is built (``pip install
'scale_runner[datasets]'``).
"""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Sequence

import torch

from .data import resolve_function
from .errors import ConfigError
from .registry import DATASETS

INSTALL = "pip install 'scale_runner[datasets]'"


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f'HFDataset needs the Hugging Face `datasets` package: {INSTALL}') from e
    return datasets


def _main_process_first():
    """Accelerate's ``main_process_first`` once the runner has set up the processes, else nothing.

    The runner builds datasets inside ``runner.build_dataloader``, after its Accelerator exists,
    so the main process loads / maps (and writes the cache) while the others wait, then reads it.
    """
    from accelerate.state import PartialState
    if not PartialState._shared_state:  # no Accelerator / PartialState yet: one process
        return contextlib.nullcontext()
    return PartialState().main_process_first()


@DATASETS.register_module()
class HFDataset(torch.utils.data.Dataset):
    """Load with ``datasets.load_dataset`` (or ``load_from_disk``), map, select columns, torch format.

    With ``streaming=True`` it builds a :class:`~scale_runner.streaming.StreamDataset` instead: an
    iterable, exactly resumable stream (local ``json``/``text``/``csv``/``parquet`` files) split
    across ranks and dataloader workers, ``map`` applied on the fly, optionally packed and
    shuffled with a buffer (see ``streaming.py``).

    Args:
        path: a hub name, a builder (``'json'``, ``'csv'``, ``'text'``, ``'parquet'``) or a directory
            (one written by ``save_to_disk`` is loaded with ``load_from_disk``).
        name, data_files, data_dir, split: as in ``load_dataset``; ``split`` may slice
            (``'train[:10%]'``); for ``load_from_disk`` it picks a split of a ``DatasetDict``.
        map: a function applied with ``Dataset.map`` (tokenization, ...): a callable, a
            ``FUNCTIONS`` name / dotted path, or ``dict(type=..., **kwargs)`` (kwargs bound to
            the function). It runs under the main process first so its cache is built once.
        map_kwargs: ``Dataset.map`` arguments (``batched=True``, ``remove_columns``, ``num_proc``).
        rename_columns: ``{old: new}``, applied after ``map``.
        columns: the columns to keep (after map and renaming); all by default.
        format: ``'torch'`` (default: numeric columns become tensors) or ``None``.
        from_disk: force ``load_from_disk`` (default: detected from the directory's content).
        streaming: stream the files instead of loading them (an iterable dataset, no ``len``).
        shuffle: streaming only: ``dict(buffer_size=..., seed=None)`` (None: the run's seed).
        pack: streaming only: a packing stage, ``dict(block_size=..., eos_id=...)``
            (``type='pack_tokens'``): fixed-length blocks of token ids, remainders carried.
        **load_kwargs: more ``load_dataset`` arguments (``cache_dir``, ``revision``, ...).
    """

    def __new__(cls, *args, streaming: bool = False, **kwargs):
        if streaming:  # another class: __init__ is not called on it
            return _stream(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, path: str, name: str | None = None, data_files: Any = None,
                 split: str | None = 'train', data_dir: str | None = None, map: Any = None,
                 map_kwargs: dict | None = None, rename_columns: dict | None = None,
                 columns: Sequence[str] | None = None, format: str | None = 'torch',
                 from_disk: bool | None = None, streaming: bool = False, shuffle: Any = None,
                 pack: Any = None, **load_kwargs):
        for key, value in (('shuffle', shuffle), ('pack', pack)):
            if value is not None:
                hint = ("the sampler's: sampler=dict(type='DefaultSampler', shuffle=True)"
                        if key == 'shuffle' else 'a batched map= (e.g. char_blocks)')
                raise ConfigError(f'dataset.{key} = {value!r} is for streamed datasets '
                                  f'(streaming=True); for this map-style dataset use {hint}')
        datasets = _import_datasets()
        self.path, self.split = path, split
        map_fn = resolve_function(map, 'dataset.map') if map is not None else None
        with _main_process_first():
            ds = self._load(datasets, path, name, data_files, split, data_dir, from_disk, load_kwargs)
            if map_fn is not None:
                ds = ds.map(map_fn, **(map_kwargs or {}))
        if rename_columns:
            _check_columns(ds, rename_columns, 'rename_columns', path)
            ds = ds.rename_columns(dict(rename_columns))
        if columns is not None:
            columns = [columns] if isinstance(columns, str) else list(columns)
            _check_columns(ds, columns, 'columns', path)
            ds = ds.select_columns(columns)
        if format is not None:
            ds = ds.with_format(format)
        self.dataset = ds

    def _load(self, datasets, path, name, data_files, split, data_dir, from_disk, load_kwargs):
        if from_disk is None:
            p = Path(path)
            from_disk = p.is_dir() and any((p / f).is_file() for f in
                                           ('dataset_dict.json', 'dataset_info.json', 'state.json'))
        if from_disk:
            ds = datasets.load_from_disk(str(path), **load_kwargs)
            if isinstance(ds, datasets.DatasetDict):
                if split is None:
                    raise ConfigError(f'dataset: {path!r} holds splits {sorted(ds)}: set split=')
                if split not in ds:
                    raise ConfigError(f'dataset.split={split!r} is not in {path!r}; available '
                                      f'splits: {sorted(ds)}')
                ds = ds[split]
            return ds
        kwargs = dict(load_kwargs)
        if name is not None:
            kwargs['name'] = name
        if data_files is not None:
            kwargs['data_files'] = _plain(data_files)
        if data_dir is not None:
            kwargs['data_dir'] = data_dir
        try:
            ds = datasets.load_dataset(path, split=split, **kwargs)
        except ValueError as e:
            if split is None or 'split' not in str(e).lower():
                raise
            available = _split_names(datasets, path, kwargs)
            raise ConfigError(f'dataset.split={split!r} is not available for {path!r}'
                              f'{_files_note(data_files)}; available splits: {available}') from e
        if isinstance(ds, datasets.DatasetDict):
            raise ConfigError(f'dataset: {path!r} has splits {sorted(ds)}: set split= to one of them')
        return ds

    @property
    def column_names(self) -> list[str]:
        return list(self.dataset.column_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[int(i)]

    def __getitems__(self, indices: list) -> list:
        """A whole batch in one read (the DataLoader uses this when it exists)."""
        rows = self.dataset[[int(i) for i in indices]]
        return [{k: v[j] for k, v in rows.items()} for j in range(len(indices))]

    def __repr__(self) -> str:
        return f'HFDataset({self.path!r}, split={self.split!r}, {len(self)} rows, columns={self.column_names})'


# Config checks bind against __init__'s parameters, not __new__'s (*args, **kwargs).
HFDataset.__signature__ = inspect.signature(HFDataset.__init__).replace(
    parameters=list(inspect.signature(HFDataset.__init__).parameters.values())[1:])


def _stream(path: str, name: str | None = None, data_files: Any = None, split: str | None = 'train',
            data_dir: str | None = None, map: Any = None, map_kwargs: dict | None = None,
            rename_columns: dict | None = None, columns: Sequence[str] | None = None,
            format: str | None = 'torch', from_disk: bool | None = None, shuffle: Any = None,
            pack: Any = None, **load_kwargs):
    """``HFDataset(..., streaming=True)``: ``load_dataset(..., streaming=True)``, ``map`` on the
    fly, as a :class:`~scale_runner.streaming.StreamDataset`."""
    datasets = _import_datasets()
    from .streaming import StreamDataset
    if from_disk:
        raise ConfigError(f'dataset: streaming=True reads data files; for the save_to_disk '
                          f'directory {path!r} give its arrow/parquet files as data_files')
    if split is None:
        raise ConfigError("dataset.split: a streamed dataset needs one split (e.g. "
                          "split='train'), got None")
    map_fn = resolve_function(map, 'dataset.map') if map is not None else None
    kwargs = dict(load_kwargs)
    for key, value in (('name', name), ('data_files', data_files), ('data_dir', data_dir)):
        if value is not None:
            kwargs[key] = _plain(value)
    try:
        ds = datasets.load_dataset(path, split=split, streaming=True, **kwargs)
    except ValueError as e:
        if 'split' not in str(e).lower():
            raise
        raise ConfigError(f'dataset.split={split!r} is not available for {path!r}'
                          f'{_files_note(data_files)}: {e}') from e
    if map_fn is not None:
        map_kwargs = dict(map_kwargs or {})
        if 'num_proc' in map_kwargs:
            raise ConfigError('dataset.map_kwargs.num_proc: a streamed map runs on the fly in each '
                              'reader; parallelize with train_dataloader.num_workers instead')
        ds = ds.map(map_fn, **map_kwargs)
    if rename_columns:
        ds = ds.rename_columns(dict(rename_columns))
    if columns is not None:
        ds = ds.select_columns([columns] if isinstance(columns, str) else list(columns))
    return StreamDataset(ds, pack=pack, shuffle=shuffle, format=format, name=str(path))


def _plain(value: Any) -> Any:
    """Config containers (ConfigDict, tuples) as the plain dicts / lists ``datasets`` expects."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


def _files_note(data_files: Any) -> str:
    return f' with data_files={_plain(data_files)!r}' if data_files is not None else ''


def _split_names(datasets, path: str, kwargs: dict) -> list[str]:
    try:
        return sorted(datasets.load_dataset(path, **kwargs))
    except Exception:  # noqa: BLE001 - only for the error message
        try:
            return sorted(datasets.get_dataset_split_names(path, kwargs.get('name')))
        except Exception:  # noqa: BLE001
            return ['(could not be listed)']


def _check_columns(ds, wanted, key: str, path: str) -> None:
    have = list(ds.column_names)
    missing = [c for c in wanted if c not in have]
    if missing:
        from .errors import closest
        hints = [f'{m!r} (did you mean {closest(m, have, n=1)[0]!r}?)' if closest(m, have, n=1)
                 else repr(m) for m in missing]
        raise ConfigError(f'dataset.{key}: column(s) {", ".join(hints)} not in {path!r}; '
                          f'available columns: {have}')

