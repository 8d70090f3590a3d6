"""Sharded tensors in checkpoints, on ``torch.distributed.checkpoint`` (DCP).

Tensors that no rank holds whole (FSDP2's ``DTensor`` parameters, optimizer moments, EMA
averages) are written by every rank as the shards it holds, with DCP's planner and its Hugging
Face safetensors storage (``save_distributed=True``): one ``sharded/shard-<k>-model-...``
safetensors file per rank, each shard's offsets in the file's own header. Loading reads them
onto any number of processes (DCP's planner reshards: a ``DTensor`` target takes its own shard,
a plain one the full tensor). Nothing here writes DCP's pickled ``.metadata``: the Hugging Face
storage keeps none, and every file is checked to be safetensors after it is written.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

SHARDED_DIR = 'sharded'


def is_dtensor(obj) -> bool:
    """A ``DTensor``; without importing DTensor (no run has one unless something imported it)."""
    module = sys.modules.get('torch.distributed.tensor')
    return module is not None and isinstance(obj, module.DTensor)


def _writer(directory: Path):
    """DCP's Hugging Face storage writer, writing each rank's file straight to disk.

    Its own ``write_data`` builds the whole file in memory first (``safetensors.torch.save``,
    then a copy into ``bytes``): twice the rank's shards at the peak (bench/README.md). This
    one gives each rank's planned items to ``save_file`` with the same header (the shards'
    offsets under ``DCP_SHARDING_INFO``), so the reader and the planner see the same files."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    try:
        from torch.distributed.checkpoint import _hf_utils as hf
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.storage import WriteResult
    except ImportError:  # another torch: its own writer (correct, with the in-memory copy)
        return HuggingFaceStorageWriter(str(directory), save_distributed=True)

    class StreamingWriter(HuggingFaceStorageWriter):
        def write_data(self, plan, planner):
            import json

            from safetensors.torch import save_file
            from torch.futures import Future
            results, tensors, offsets = [], {}, {}
            name = hf._gen_file_name(1, 1, plan.storage_data.get('shard_index'))
            for item in plan.items:
                tensor = planner.resolve_data(item).detach().cpu().contiguous()
                tensors[item.index.fqn] = tensor
                offsets[item.index.fqn] = {hf.SAVED_OFFSETS_KEY: list(item.tensor_data.chunk.offsets)}
                length = tensor.numel() * tensor.element_size()
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, 0, length)))
            if tensors:
                path = Path(self.path) / name
                save_file(tensors, path, metadata={hf.CUSTOM_METADATA_KEY: json.dumps(offsets),
                                                    hf.DCP_VERSION_KEY: str(hf.HF_DCP_VERSION),
                                                    hf.FORMAT_KEY: hf.FORMAT_VALUE})
                from .format import _umask
                os.chmod(path, 0o666 & ~_umask())  # save_file creates 0600: the others' mode
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            done: Future = Future()
            done.set_result(results)
            return done
    return StreamingWriter(str(directory), save_distributed=True)


def save_shards(tensors: dict, directory: Path, rank: int, group=None) -> list[str]:
    """Write this rank's shards of ``tensors`` (the same names on every rank) into ``directory``;
    return the names of this rank's files. Collective over ``group`` (None: the default one)."""
    import torch.distributed.checkpoint as dcp

    from .format import CheckpointError, _load_tensors, _read
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, storage_writer=_writer(directory), process_group=group)
    prefix = f'shard-{rank + 1:05d}-'  # DCP numbers the ranks' plans from 1
    mine = sorted(n for n in os.listdir(directory) if n.startswith(prefix))
    for name in mine:  # the bytes, not the name: DCP would write a pickled object into the file
        path = directory / name
        held = _load_tensors(_read(path, own=True), path)
        if not set(held) <= set(tensors):
            raise CheckpointError(f'{path} holds tensors that were not saved: {sorted(set(held) - set(tensors))[:5]}')
    return mine


def shard_shapes(directory: Path) -> dict[str, tuple[tuple, torch.dtype]]:
    """The global shape and dtype of every sharded tensor (read from the files' headers)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    meta = HuggingFaceStorageReader(str(directory)).read_metadata()
    return {k: (tuple(md.size), md.properties.dtype) for k, md in meta.state_dict_metadata.items()}


def load_shards(directory: Path, targets: dict, where: str) -> dict:
    """Fill ``targets`` (name -> tensor, or None for a full CPU tensor allocated here) from the
    shards in ``directory``. A ``DTensor`` target receives only its own shard, whatever the
    number of processes that wrote them. Collective when a target is a ``DTensor``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    from .format import CheckpointError
    shapes = shard_shapes(directory)
    missing = sorted(set(targets) - set(shapes))
    if missing:
        raise CheckpointError(f'{where}: the sharded files hold no {missing[:5]}')
    out = {}
    for name, target in targets.items():
        shape, dtype = shapes[name]
        if target is None:
            target = torch.empty(shape, dtype=dtype)
        elif tuple(target.shape) != shape:
            raise CheckpointError(f'{where}: {name} has shape {shape} in the checkpoint, '
                                  f'{tuple(target.shape)} here')
        out[name] = target
    distributed = any(is_dtensor(t) for t in out.values())
    dcp.load(out, storage_reader=HuggingFaceStorageReader(str(directory)), no_dist=not distributed)
    return out
