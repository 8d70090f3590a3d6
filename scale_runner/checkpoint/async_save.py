"""Checkpoints written in the background (``default_hooks.checkpoint.async_save=True``).

The train loop blocks only while the state is copied to host memory (pinned on a GPU; a
``DTensor``'s shard is copied where it lives); writing, fsync, the manifest, the renames,
``latest`` and retention run in a thread, the same :class:`~.format.CheckpointWriter` as a
synchronous save, with its agreements over a gloo group of its own (so they never interleave
with training's collectives). At most one save is in flight. Its outcome is agreed by every
rank at an iteration boundary (:meth:`AsyncCheckpoint.poll`), so a failed write stops every
rank at the same iteration, with the writer's own ``CheckpointError``; the crash safety is the
synchronous save's: until the manifest and the renames, the previous checkpoint is ``latest``.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .format import CheckpointWriter
from .sharded import is_dtensor


def snapshot(obj):
    """``obj`` with every tensor copied to host memory (a ``DTensor``: its shard, copied on its
    device), so training may change the originals while the copy is written."""
    if is_dtensor(obj):
        from torch.distributed.tensor import DTensor
        local = obj.to_local().detach().clone()
        return DTensor.from_local(local, obj.device_mesh, obj.placements, run_check=False,
                                  shape=obj.shape, stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.device.type == 'cpu':
            return t.clone()
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
        return host.copy_(t, non_blocking=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot(v) for v in obj)
    return obj


class AsyncCheckpoint:
    """The one background save in flight (every rank has one, for the same checkpoint)."""

    def __init__(self, accelerator, group, path: Path, parts: tuple, then: Callable | None):
        self.path = path
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.seconds: float | None = None
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the non-blocking copies to pinned memory are complete
        writer = CheckpointWriter(accelerator, group)

        def run():
            try:
                writer.write(path, *parts)
                if then is not None:
                    then()
            except BaseException as e:  # noqa: BLE001 - reported on the training thread
                self.error = e
            self.seconds = time.monotonic() - self.started
        self._thread = threading.Thread(target=run, name=f'checkpoint {path.name}', daemon=False)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        """Block until the write is complete; raise its error, if any."""
        self._thread.join()
        if self.error is not None:
            raise self.error

    def poll(self, group) -> bool:
        """Whether every rank's write is complete (then :meth:`wait` raises a failure); the
        ranks agree (one all-reduce of two CPU integers over ``group``, None on one process)."""
        failed, busy = int(self.done() and self.error is not None), int(not self.done())
        if group is not None:
            from ..collective import agree_max
            failed, busy = agree_max([failed, busy], group)
        if failed:
            self.wait()  # this rank's write agreed on the same failure: it ends with it
        return not busy
