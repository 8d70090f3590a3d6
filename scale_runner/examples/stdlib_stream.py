"""The streamed variant of the char LM data (``configs/char_lm_stream.py``).

- ``StdlibTextStream`` (``DATASETS``): writes the standard library's ``[a-s]*.py`` files, in a
  seeded random order, as JSON-lines shards ``{"text": <file>}`` into ``out_dir`` at first use
  (the main process writes, atomically; the others wait), then streams them with
  ``HFDataset(path='json', streaming=True, ...)``.
- ``byte_ids`` (``FUNCTIONS``): a per-document ``map``: ``text`` -> ``input_ids`` (UTF-8 bytes).
"""
from __future__ import annotations

import json
import os
import random
import sysconfig
from pathlib import Path

import numpy as np

from ..registry import DATASETS, FUNCTIONS


@FUNCTIONS.register_module()
def byte_ids(example: dict, text_key: str = 'text') -> dict:
    """One document's UTF-8 bytes as int64 ids (the model's vocabulary is the 256 byte values)."""
    return {'input_ids': np.frombuffer(example[text_key].encode('utf-8'), dtype=np.uint8).astype(np.int64)}


def write_shards(out_dir: str | Path, pattern: str = '[a-s]*.py', shards: int = 8,
                 seed: int = 0) -> list[str]:
    """The stdlib files matching ``pattern``, shuffled with ``seed``, dealt round-robin into
    ``shards`` JSON-lines files (kept if they already exist). Returns their paths."""
    out = Path(out_dir)
    files = [out / f'stdlib-{i:02d}-of-{shards:02d}.jsonl' for i in range(shards)]
    if all(f.is_file() for f in files):
        return [str(f) for f in files]
    sources = sorted(Path(sysconfig.get_paths()['stdlib']).glob(pattern))
    random.Random(seed).shuffle(sources)  # a pre-shuffled corpus: each shard mixes the alphabet
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files):
        tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
        with open(tmp, 'w', encoding='utf-8') as f:
            for src in sources[i::shards]:
                text = src.read_text(encoding='utf-8', errors='replace')
                f.write(json.dumps({'text': text}) + '\n')
        os.replace(tmp, path)  # atomic: a reader never sees half a shard
    return [str(f) for f in files]


@DATASETS.register_module()
def StdlibTextStream(out_dir: str, pattern: str = '[a-s]*.py', shards: int = 8, seed: int = 0,
                     **stream_kwargs):
    """``HFDataset(path='json', data_files=<the shards>, streaming=True, **stream_kwargs)``."""
    from ..hf_datasets import HFDataset, _main_process_first
    with _main_process_first():
        files = write_shards(out_dir, pattern, shards, seed)
    return HFDataset(path='json', data_files=files, streaming=True, **stream_kwargs)
