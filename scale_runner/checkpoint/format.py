"""Checkpoint files: pickle-free, crash-safe, verified. (What goes into them: ``state.py``.)

A checkpoint is a directory ``<work_dir>/checkpoints/<name>/``::

    model.safetensors      the model's weights (unwrapped; tied tensors stored once each), when
                           no rank holds only shards of them
    state.safetensors      every other whole tensor (optimizer moments, hook tensors)
    state.json             the named state of every part (see ``state.py``); a tensor appears
                           as {"__tensor__": key}, a sharded one as {"__sharded__": key}
    sharded/shard-<k>-*.safetensors   each rank's shards of every sharded tensor (FSDP2's
                           DTensors: weights, moments, EMA averages), see ``sharded.py``
    rng_<rank>.safetensors / rng_<rank>.json   each process's own state (its RNGs), and
    grad_<rank>.safetensors   its partial gradients inside an accumulation window
    manifest.json          written last, by the main process once every rank's files are on
                           disk: the size of every other file and the XXH3-64 hash of each of
                           its CHECKSUM_CHUNK pieces (checked in parallel on every core)

It is written into ``.tmp-<name>``, fsync'ed, renamed into place, then the ``latest`` pointer
is replaced atomically; only then may old checkpoints be deleted. A checkpoint without a
manifest, or missing any file the manifest lists (a rank's part), is not read. Loading runs
no code: safetensors and JSON only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import stat
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..collective import gather
from .sharded import SHARDED_DIR, is_dtensor, save_shards

MANIFEST = 'manifest.json'
LATEST = 'latest'
CHECKSUM_CHUNK = 32 << 20
# 4: named state parts, sharded/; 3: XXH3-64 per piece; 2: CRC-32 per piece; 1: sha256 per file
FORMAT_VERSION = 4


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit the run."""


# ---- tensors <-> JSON --------------------------------------------------------------------
def split_tensors(obj: Any, tensors: dict[str, torch.Tensor], path: str = '',
                  sharded: dict | None = None) -> Any:
    """Replace every tensor in ``obj`` by ``{"__tensor__": key}``, collecting it in ``tensors``;
    with ``sharded``, a ``DTensor`` by ``{"__sharded__": key}``, collected (as is) there."""
    if sharded is not None and is_dtensor(obj):
        sharded[path] = obj
        return {'__sharded__': path}
    if isinstance(obj, torch.Tensor):
        key = path or 'tensor'
        tensors[key] = obj.detach().cpu().contiguous()
        return {'__tensor__': key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise CheckpointError(f'checkpoint key {path}.{k!r} is a {type(k).__name__}; '
                                      f'only str and int keys can be stored')
            out[str(k) if isinstance(k, str) else f'__int__{k}'] = split_tensors(
                v, tensors, f'{path}.{k}'.lstrip('.'), sharded)
        return out
    if isinstance(obj, (list, tuple)):
        return [split_tensors(v, tensors, f'{path}.{i}', sharded) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f'cannot store {type(obj).__name__} at checkpoint key {path!r}: only '
                          f'tensors, numbers, strings, None, lists and dicts are stored (no pickle)')


def sharded_tensors(obj: Any, path: str = '') -> dict:
    """Only the ``DTensor``s of ``obj``, by the keys :func:`split_tensors` gives them (what a
    rank other than the main process contributes to a save: its shards)."""
    if is_dtensor(obj):
        return {path: obj}
    items = (obj.items() if isinstance(obj, dict) else enumerate(obj)
             if isinstance(obj, (list, tuple)) else ())
    out: dict = {}
    for k, v in items:
        out.update(sharded_tensors(v, f'{path}.{k}'.lstrip('.') if isinstance(obj, dict)
                                   else f'{path}.{k}'))
    return out


def join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors` (``tensors`` holds the sharded ones too, once loaded;
    a sharded one not loaded stays a ``{"__sharded__": key}`` placeholder)."""
    if isinstance(obj, dict):
        if set(obj) == {'__tensor__'}:
            return tensors[obj['__tensor__']]
        if set(obj) == {'__sharded__'}:
            return tensors.get(obj['__sharded__'], obj)
        return {(int(k[7:]) if isinstance(k, str) and k.startswith('__int__') else k):
                join_tensors(v, tensors)
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [join_tensors(v, tensors) for v in obj]
    return obj


def sharded_keys(obj: Any) -> list[str]:
    """The keys of the ``{"__sharded__": key}`` placeholders in a state document."""
    if isinstance(obj, dict):
        if set(obj) == {'__sharded__'}:
            return [obj['__sharded__']]
        return [k for v in obj.values() for k in sharded_keys(v)]
    if isinstance(obj, list):
        return [k for v in obj for k in sharded_keys(v)]
    return []


def model_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors; tensors sharing storage are copied (safetensors refuses aliases)."""
    out, seen = {}, set()
    for k, v in state_dict.items():
        t = v.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


# ---- atomic file writing --------------------------------------------------------------------
def _named(path: Path, e: Exception) -> Exception:
    """``e`` as an OSError naming the file (what the CheckpointError of a failed save quotes):
    Python's own write errors carry no file name, and safetensors wraps the system's error
    (``... (os error 28)``) in a SafetensorError."""
    if isinstance(e, OSError):
        if e.filename is not None or e.errno is None:
            return e
        return OSError(e.errno, e.strerror, path.name)
    code = re.search(r'os error (\d+)', str(e))
    if code:
        return OSError(int(code.group(1)), os.strerror(int(code.group(1))), path.name)
    return SafetensorError(f'{path.name}: {e}')


def _write(path: Path, data: bytes) -> dict:
    try:
        with open(path, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, SafetensorError) as e:
        raise _named(path, e) from e
    return _entry(data)


def _write_tensors(path: Path, tensors: dict, io: ThreadPoolExecutor) -> Future:
    """``save_file`` straight to disk (no in-memory copy of the whole file); its fsync and
    checksum run in ``io`` (the future's result is the manifest entry), so the next file is
    written while this one goes to the disk, as one would write both and then sync both."""
    try:
        save_file(tensors, path)
        # safetensors creates the file 0600: give it the permissions of the other files
        # (umask), so that a team sharing a work_dir can read the checkpoints.
        os.chmod(path, 0o666 & ~_umask())
    except (OSError, SafetensorError) as e:
        raise _named(path, e) from e
    return io.submit(_sync_and_entry, path)


def _sync_and_entry(path: Path) -> dict:
    """fsync and checksum concurrently: both release the GIL, and the checksum reads from the
    page cache. A failed fsync (EIO, ENOSPC at write-back) fails the save."""
    failed: list = []

    def sync(fd):
        try:
            os.fsync(fd)
        except OSError as e:
            failed.append(e)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            syncer = threading.Thread(target=sync, args=(fd,))
            syncer.start()
            entry = _entry(_read(path))
            syncer.join()
        finally:
            os.close(fd)
        if failed:
            raise failed[0]
    except OSError as e:
        raise _named(path, e) from e
    return entry


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for every thread)
        with open('/proc/self/status') as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith('Umask:'))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o22)
        os.umask(mask)
        return mask


# Integrity, not authentication (the manifest is not signed, so sha256 would prove no more).
# XXH3-64 finds torn, truncated or bit-flipped pieces (a random error passes 1 in 2^64) at memory
# speed: 12 GB/s per core here, against 2.1-3.3 GB/s for zlib's CRC-32 (format 2), which made the
# check cost as much as the load itself. It reads any buffer (a memory map too) and releases
# the GIL, so the pieces are checked on every core at once. xxhash is a dependency of datasets.
def _xxh3(data) -> str:
    import xxhash  # imported on first use: most runs import scale_runner without checkpointing
    return xxhash.xxh3_64_hexdigest(data)


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


CHECKSUMS = {'xxh3_64': _xxh3, 'crc32': zlib.crc32}  # manifest key -> per-piece function


def _checksum_jobs(pool: ThreadPoolExecutor, data, chunk: int, fn=_xxh3) -> list:
    """Futures of ``fn`` of each ``chunk``-byte piece of ``data`` (one piece if it fits)."""
    view = memoryview(data)
    return [pool.submit(fn, view[a:a + chunk]) for a in range(0, max(len(view), 1), chunk)]


def _checksum_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 1)))


def _entry(data) -> dict:
    """The manifest entry of a file's bytes: size, piece size and each piece's XXH3-64."""
    if len(data) <= CHECKSUM_CHUNK:
        digests = [_xxh3(data)]
    else:
        with _checksum_pool() as pool:
            digests = [job.result() for job in _checksum_jobs(pool, data, CHECKSUM_CHUNK)]
    return {'size': len(data), 'chunk_size': CHECKSUM_CHUNK, 'xxh3_64': digests}


def _fsync(path: Path) -> None:
    """fsync a file or a directory (its entries: renames, new files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointWriter:
    """Writes one checkpoint; every rank calls :meth:`write` (collective)."""

    def __init__(self, accelerator, group=None):
        self.accelerator = accelerator
        self.group = group  # the process group of the save's agreements (None: the default)

    def write(self, ckpt_dir: Path, model_state: dict | None, state: dict,
              rank_state: dict | None = None) -> Path:
        """Write ``state`` (a mapping of JSON values and tensors: the main process writes its
        whole tensors, every rank its shards of the ``DTensor``s in it), ``model_state`` (the
        main process's whole weights, or None) and ``rank_state`` (this process's own:
        ``{stem: state}`` becomes ``<stem>_<rank>.safetensors`` and, if it holds more than
        tensors, ``<stem>_<rank>.json``).

        A failure on any rank (disk full, quota, permissions, a state that cannot be stored)
        stops every rank at the next of the save's agreements (each is a barrier the save
        needs anyway), the temporary directory is removed, and every rank raises: one
        :class:`CheckpointError` naming the checkpoint, the bytes it needed, the free space
        and the previous checkpoint, which is intact (``latest`` still points at it). A rank
        whose own failure was not an I/O error re-raises that exception."""
        acc = self.accelerator
        rank, main = acc.process_index, acc.is_main_process
        ckpt_dir = Path(ckpt_dir)
        tmp = ckpt_dir.parent / f'.tmp-{ckpt_dir.name}'
        self.placed = False  # set once the complete checkpoint has its name
        shards = sharded_tensors(state)
        entries: dict = {}  # this rank's files -> manifest entries

        def prepare():
            if os.path.lexists(tmp):
                _remove(tmp)  # left by a crash during an earlier save
            tmp.mkdir(parents=True)

        def own_files():
            with ThreadPoolExecutor(max_workers=2) as io:
                if shards:  # collective: the main process's temporary directory exists
                    for name in save_shards(shards, tmp / SHARDED_DIR, rank, self.group):
                        entries[f'{SHARDED_DIR}/{name}'] = _entry(_read(tmp / SHARDED_DIR / name))
                for stem, part in (rank_state or {}).items():
                    tensors: dict = {}
                    doc = split_tensors(part, tensors)
                    name = f'{stem}_{rank}.safetensors'
                    entries[name] = _write_tensors(tmp / name, model_tensors(tensors), io).result()
                    if doc != {k: {'__tensor__': k} for k in tensors}:
                        name = f'{stem}_{rank}.json'
                        entries[name] = _write(tmp / name, json.dumps(doc).encode())

        failures, mine, ranks_entries = [], None, []
        try:
            for step in (prepare if main else None, own_files):
                reason, mine = self._attempt(step, rank)
                failures = [f for f in gather(reason, self.group) if f]
                if failures:
                    break
            if not failures:
                ranks_entries = gather(entries, self.group)
                reason, mine = self._attempt(
                    (lambda: self._write_main(ckpt_dir, tmp, model_state, state, ranks_entries))
                    if main else None, rank)
                failures = [f for f in gather(reason, self.group) if f]
        except BaseException:  # an interrupt: leave nothing half written behind
            if main:
                _discard(tmp)
            raise
        if not failures:
            return ckpt_dir
        if main:
            _discard(tmp)
        if mine is not None and not _is_io_error(mine):
            raise mine
        raise _save_error(ckpt_dir, failures, model_state, state, rank_state, acc.num_processes)

    def _attempt(self, step, rank: int) -> tuple[dict | None, BaseException | None]:
        """Run ``step`` (None: nothing to do on this rank); ``(reason, exception)`` if it failed."""
        if step is None:
            return None, None
        try:
            step()
        except Exception as e:  # noqa: BLE001 - every rank must hear of it, or the others wait
            return {'rank': rank, 'error': f'{type(e).__name__}: {e}', 'io': _is_io_error(e),
                    'placed': self.placed}, e
        return None, None

    def _write_main(self, ckpt_dir: Path, tmp: Path, model_state: dict | None, state: dict,
                    ranks_entries: list[dict]) -> None:
        """The main process's part, once every rank's files are on disk: the model, the
        state, the manifest (the commit record), then the renames."""
        files: dict = {}
        with ThreadPoolExecutor(max_workers=2) as io:
            pending = {}
            if model_state is not None:
                pending['model.safetensors'] = _write_tensors(tmp / 'model.safetensors',
                                                              model_tensors(model_state), io)
            tensors: dict = {}
            doc = split_tensors(state, tensors, sharded={})
            doc['format_version'] = FORMAT_VERSION
            pending['state.safetensors'] = _write_tensors(tmp / 'state.safetensors', tensors, io)
            files['state.json'] = _write(tmp / 'state.json', json.dumps(doc, indent=1).encode())
            files.update((name, job.result()) for name, job in pending.items())
        for rank_files in ranks_entries:
            files.update(rank_files)
        if any(name.startswith(f'{SHARDED_DIR}/') for name in files):
            _fsync(tmp / SHARDED_DIR)
        _write(tmp / MANIFEST, json.dumps({'format_version': FORMAT_VERSION, 'files': files,
                                           'world_size': self.accelerator.num_processes},
                                          indent=1).encode())
        _fsync(tmp)
        if os.path.lexists(ckpt_dir) and not _is_checkpoint(ckpt_dir):
            _move_aside(ckpt_dir)  # a file, link or foreign directory under our name: kept
        if os.path.lexists(ckpt_dir):
            # Same name saved again (e.g. 'last'): swap the two in one step, so a crash leaves
            # one complete checkpoint under the name; then the old one (now at tmp) goes.
            if _exchange(tmp, ckpt_dir):
                self.placed = True
                _fsync(ckpt_dir.parent)
                _remove(tmp)
            else:  # no renameat2 (not Linux): move the old one aside, never delete first
                old = ckpt_dir.parent / f'.old-{ckpt_dir.name}'
                if os.path.lexists(old):
                    _remove(old)
                os.rename(ckpt_dir, old)
                os.rename(tmp, ckpt_dir)
                self.placed = True
                _remove(old)
        else:
            os.rename(tmp, ckpt_dir)
            self.placed = True
        _fsync(ckpt_dir.parent)
        set_latest(ckpt_dir)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directory entries (Linux ``renameat2(RENAME_EXCHANGE)``); False
    where the system has no such call."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):  # the kernel or file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), b.name)


def set_latest(ckpt_dir: Path) -> None:
    """Atomically point ``<checkpoints>/latest`` at ``ckpt_dir``."""
    tmp = ckpt_dir.parent / f'.{LATEST}.tmp'
    latest = ckpt_dir.parent / LATEST
    if os.path.lexists(tmp):
        _remove(tmp)
    if os.path.lexists(latest) and (latest.is_symlink() or not latest.is_file()):
        _move_aside(latest)  # a directory or link named 'latest' cannot be replaced atomically
    try:
        _write(tmp, (ckpt_dir.name + '\n').encode())
        os.replace(tmp, latest)
    except BaseException:
        _discard(tmp)
        raise
    _fsync(ckpt_dir.parent)


def _is_io_error(e: BaseException) -> bool:
    """An error of the file system (safetensors reports its own as SafetensorError)."""
    return isinstance(e, (OSError, SafetensorError))


def _discard(path: Path) -> None:
    """Remove our own temporary file or directory, if there is one, whatever it holds."""
    try:
        if os.path.lexists(path):
            _remove(path)
    except OSError as e:
        warnings.warn(f'could not remove {path}: {e}')


def _is_checkpoint(path: Path) -> bool:
    """A real directory (not a link) with a manifest: something we wrote."""
    return path.is_dir() and not path.is_symlink() and (path / MANIFEST).is_file()


def _remove(path: Path) -> None:
    """Remove a file, a link (not its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _move_aside(path: Path) -> Path:
    """Rename debris occupying a checkpoint's name to ``<name>.debris-<time>`` (never deleted:
    it is not ours to delete) and warn."""
    import time
    aside = path.with_name(f'{path.name}.debris-{time.strftime("%Y%m%d_%H%M%S")}-{os.getpid()}')
    os.rename(path, aside)
    warnings.warn(f'{path} was in the way of a checkpoint and is not one (a file, link or '
                  f'directory without {MANIFEST}): moved to {aside}')
    return aside


def _save_error(ckpt_dir: Path, failures: list[dict], model_state, state, rank_state=None,
                world: int = 1) -> CheckpointError:
    """Which checkpoint failed and why, how much it needed, how much is free, what is intact."""
    root = ckpt_dir.parent
    why = '; '.join(f"rank {f['rank']}: {f['error']}" for f in failures)
    pointer = _pointer(root)
    if any(f['placed'] for f in failures):  # only the pointer's update failed
        now = ('points at it, but that may not be on disk yet' if pointer == ckpt_dir.name
               else f'still points at {pointer}' if pointer else 'names no checkpoint')
        return CheckpointError(
            f'checkpoint {ckpt_dir} was written completely, but pointing {root / LATEST} at it '
            f'failed ({why}): {LATEST} {now}. {ckpt_dir} is valid: resume from it with '
            f'resume={str(ckpt_dir)!r}, or free space and resume with --resume.')
    if pointer:
        previous = f'the previous checkpoint {root / pointer} is intact ({LATEST} still points at it)'
    elif any(_is_checkpoint(p) for p in (root.iterdir() if root.is_dir() else ())):
        previous = f'{root / LATEST} names no checkpoint; the checkpoints in {root} are untouched'
    else:
        previous = 'no earlier checkpoint was written'
    if not all(f['io'] for f in failures):
        return CheckpointError(f'saving checkpoint {ckpt_dir} failed ({why}); nothing of it was '
                               f'kept and {previous}.')
    needed, free = _bytes_needed(model_state, state, rank_state, world), _free_bytes(root)
    need = f'it needed about {_size(needed)} in all' if needed is not None else 'its size is unknown'
    have = (f'{_size(free)} are free on the file system of {root}' if free is not None
            else f'the free space of {root} is unknown')
    return CheckpointError(
        f'saving checkpoint {ckpt_dir} failed ({why}): {need} (tensors and JSON), and {have}. '
        f'Nothing of it was kept (its temporary directory was removed) and {previous}. Free '
        f'space (or set default_hooks.checkpoint.out_dir to another disk), then resume with '
        f'--resume.')


def _pointer(root: Path) -> str | None:
    """The checkpoint ``latest`` names, if it is a readable file naming one; else None."""
    latest = root / LATEST
    try:
        name = latest.read_bytes().decode('utf-8').strip() if latest.is_file() else ''
    except (OSError, UnicodeDecodeError):
        return None
    return name if name and '/' not in name and _is_checkpoint(root / name) else None


def _bytes_needed(model_state, state, rank_state=None, world: int = 1) -> int | None:
    """The bytes of the tensors and the state JSON, with every rank's own state (partial
    gradients, RNGs) and shards counted as large as this rank's (headers add a little)."""
    def nbytes(values) -> int:
        return sum(t.numel() * t.element_size() for t in values)
    try:
        tensors, mine, shards = {}, {}, {}
        doc = split_tensors(state, tensors, sharded=shards)
        split_tensors(rank_state or {}, mine)
        local = [getattr(t, '_local_tensor', t) for t in shards.values()]
        return (nbytes((model_state or {}).values()) + nbytes(tensors.values())
                + len(json.dumps(doc, indent=1).encode()) + world * (nbytes(mine.values()) + nbytes(local)))
    except (CheckpointError, TypeError, ValueError):
        return None


def _free_bytes(path: Path) -> int | None:
    """Free space (for this user) on the file system of ``path`` or its nearest existing parent."""
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _size(n: int) -> str:
    """``1,234,567 bytes (1.2 MiB)``."""
    for unit, scale in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
        if n >= scale:
            return f'{n:,} bytes ({n / scale:.1f} {unit})'
    return f'{n:,} bytes'


# ---- reading ----------------------------------------------------------------------------------
def verify(ckpt_dir: Path) -> dict[str, bytes]:
    """Map every file listed in the manifest and check its size and checksums; return the maps."""
    ckpt_dir = Path(ckpt_dir)
    mpath = ckpt_dir / MANIFEST
    if not os.path.lexists(mpath):
        raise CheckpointError(f'{mpath} is missing (the checkpoint was not completely written)')
    _check_regular(mpath, ckpt_dir)
    try:
        raw = _read(mpath, own=True)
        manifest = json.loads(bytes(raw))
        files = manifest['files']
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f'{mpath} is not a valid manifest: {e}') from None
    if not isinstance(files, dict):
        raise CheckpointError(f'{mpath} is not a valid manifest: "files" is not an object')
    out, jobs = {MANIFEST: raw}, {}
    # Every file is mapped, not read: the checksum faults its pages in and the tensors view them.
    for name in files:
        if not _valid_name(name):
            raise CheckpointError(f'{mpath} lists an invalid file name {name!r}')
        if os.path.lexists(ckpt_dir / name):  # a missing one is reported below
            _check_regular(ckpt_dir / name, ckpt_dir)  # every file, before the first is opened
    _check_sharded_dir(ckpt_dir, [n for n in files if '/' in n])
    with _checksum_pool() as pool:
        for name, entry in files.items():
            expected, chunk, fn = _expected_checksums(entry)
            if expected is None:
                raise CheckpointError(f'{mpath} has no valid size/checksums for {name!r}')
            p = ckpt_dir / name
            if not p.is_file():
                raise CheckpointError(f'{p} ({_part(name)}) is listed in the manifest but missing: '
                                      f'the checkpoint is incomplete')
            out[name] = _read(p, own=True)
            if len(out[name]) != entry['size']:
                raise CheckpointError(f'{p} is damaged: its size differs from {MANIFEST}')
            whole = max(len(out[name]), 1)  # format 1: one checksum of the whole file
            jobs[name] = (expected, _checksum_jobs(pool, out[name], chunk or whole, fn))
        for name, (expected, futures) in jobs.items():
            if [f.result() for f in futures] != expected:
                raise CheckpointError(f'{ckpt_dir / name} is damaged: its checksum differs from '
                                      f'{MANIFEST}')
    return out


def _valid_name(name: Any) -> bool:
    """A file of the checkpoint's own: ``name`` or ``sharded/name``, no hidden or path parts."""
    if not isinstance(name, str) or '\\' in name or name == MANIFEST:
        return False
    parts = name.split('/')
    if len(parts) == 2 and parts[0] != SHARDED_DIR:
        return False
    return len(parts) <= 2 and all(p and not p.startswith('.') for p in parts)


def _part(name: str) -> str:
    """Whose part of the checkpoint a file is, for the error that it is missing."""
    m = re.fullmatch(r'(\w+?)_(\d+)\.(safetensors|json)', name)
    if m:
        return f"rank {m.group(2)}'s {m.group(1)} state"
    m = re.fullmatch(rf'{SHARDED_DIR}/shard-(\d+)-.*', name)
    if m:
        return f"rank {int(m.group(1)) - 1}'s shards"
    return 'written by the main process'


def _check_sharded_dir(ckpt_dir: Path, names: list[str]) -> None:
    """``sharded/`` is a real directory holding exactly the manifest's shard files (DCP's
    reader reads every safetensors file there: one planted beside them must not be)."""
    shard_dir = ckpt_dir / SHARDED_DIR
    if not os.path.lexists(shard_dir):
        return  # no shards, or all missing: reported file by file
    st = os.lstat(shard_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f'{shard_dir} is not a directory ({_kind(st.st_mode)}): it is not read')
    extra = sorted(set(f'{SHARDED_DIR}/{n}' for n in os.listdir(shard_dir)) - set(names))
    if extra:
        raise CheckpointError(f'{shard_dir} holds files the manifest does not list ({extra[:3]}): '
                              f'the shards are not read')


def _check_regular(path: Path, ckpt_dir: Path) -> None:
    """Refuse a link, a non-regular file (a FIFO would block the read) or anything resolving
    outside the checkpoint, without opening it (``os.lstat`` only)."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f'{path} is a symbolic link (to {os.readlink(path)!r}): a checkpoint '
                              f'holds only its own regular files, so it is not read')
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f'{path} is not a regular file ({_kind(st.st_mode)}): it is not read')
    root = ckpt_dir.resolve()
    if path.resolve().parent not in (root, root / SHARDED_DIR) or (
            path.parent.name == SHARDED_DIR and os.path.islink(path.parent)):
        raise CheckpointError(f'{path} resolves outside {ckpt_dir}: it is not read')


def _expected_checksums(entry: Any) -> tuple[list | None, int | None, Any]:
    """``(checksums, chunk_size, function)`` of a manifest entry (``chunk_size`` None: one
    checksum of the whole file, format 1's sha256); ``(None, None, None)`` if it is malformed."""
    if not isinstance(entry, dict) or not isinstance(entry.get('size'), int):
        return None, None, None
    if isinstance(entry.get('sha256'), str):
        return [entry['sha256']], None, _sha256
    chunk = entry.get('chunk_size')
    for key, fn in CHECKSUMS.items():
        sums = entry.get(key)
        if (isinstance(chunk, int) and chunk > 0 and isinstance(sums, list)
                and len(sums) == max(-(-entry['size'] // chunk), 1)):
            return sums, chunk, fn
    return None, None, None


# safetensors dtype names -> torch dtypes (the format's own table).
_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
           'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8,
           'U8': torch.uint8, 'BOOL': torch.bool}
for _name, _attr in (('F8_E4M3', 'float8_e4m3fn'), ('F8_E5M2', 'float8_e5m2'), ('U16', 'uint16'),
                     ('U32', 'uint32'), ('U64', 'uint64')):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, 'a directory'), (stat.S_ISFIFO, 'a FIFO'),
                       (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device'), (stat.S_ISLNK, 'a symbolic link')):
        if test(mode):
            return kind
    return 'not a regular file'


_OWN_FLAGS = os.O_RDONLY | getattr(os, 'O_NOFOLLOW', 0) | getattr(os, 'O_NONBLOCK', 0)


def _read(path: Path, own: bool = False):
    """The file's bytes as a private, writable memory map: tensors view it without a copy, and
    nothing written to them reaches the file. A file replaced later (checkpoints are always
    new files, renamed into place) does not affect the mapping.

    ``own``: a checkpoint's own file, checked by :func:`_check_regular` already; a link or a
    FIFO swapped in since is still refused, not followed, and never blocks the open."""
    fd = os.open(path, _OWN_FLAGS if own else os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if own and not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f'{path} is not a regular file ({_kind(st.st_mode)}): it is not read')
        if st.st_size == 0:
            return bytearray()
        return mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        if own and e.errno == getattr(errno, 'ELOOP', None):  # O_NOFOLLOW met a link
            raise CheckpointError(f'{path} is a symbolic link: it is not read') from None
        raise
    finally:
        os.close(fd)


def _load_tensors(data, where: Path) -> dict[str, torch.Tensor]:
    """Parse a safetensors buffer (never a pickle) into tensors that view it without copying.

    The format is an 8-byte header length, a JSON header (dtype, shape, data offsets per
    tensor) and the raw data; every offset is checked against the buffer before use.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f'{where} is not a valid safetensors file ({why}); pickled files '
                               f'are never loaded')
    if len(data) < 8:
        raise bad('too short')
    n = int.from_bytes(data[:8], 'little')
    if n > len(data) - 8:
        raise bad('header length past the end')
    try:
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f'header: {e}') from None
    if not isinstance(header, dict):
        raise bad('header is not an object')
    base, size, out = 8 + n, len(data) - 8 - n, {}
    for name, info in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype = _DTYPES[info['dtype']]
            shape = [int(d) for d in info['shape']]
            start, end = (int(o) for o in info['data_offsets'])
        except (KeyError, TypeError, ValueError):
            raise bad(f'entry {name!r}') from None
        numel = 1
        for d in shape:
            numel *= d
        itemsize = torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= end <= size or end - start != numel * itemsize:
            raise bad(f'entry {name!r} has inconsistent offsets')
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
        elif (base + start) % itemsize:
            # Misaligned for its dtype: copy instead of viewing.
            out[name] = torch.frombuffer(bytearray(data[base + start:base + end]), dtype=dtype).reshape(shape)
        else:
            out[name] = torch.frombuffer(data, dtype=dtype, count=numel, offset=base + start).reshape(shape)
    return out


def _load_json(data: bytes, where: Path, kind: type = dict) -> Any:
    try:
        doc = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f'{where} is not valid JSON: {e}') from None
    if not isinstance(doc, kind):
        raise CheckpointError(f'{where} holds a JSON {type(doc).__name__}, expected a {kind.__name__}')
    return doc


def read_checkpoint(ckpt_dir: Path, rank: int = 0) -> dict:
    """Verify a checkpoint and load it: ``model`` (whole weights, or None), ``state`` (the
    named parts; sharded tensors stay ``{"__sharded__": key}`` until :func:`~.sharded.load_shards`
    reads them), ``rank`` (process ``rank``'s own state by stem), ``world_size``, ``files``
    (the verified files' bytes, for :func:`read_rank_state` of other ranks) and ``path``."""
    ckpt_dir = Path(ckpt_dir)
    blobs = verify(ckpt_dir)
    for name in ('state.json', 'state.safetensors'):
        if name not in blobs:
            raise CheckpointError(f'{ckpt_dir / name} is missing from {MANIFEST}')
    doc = _load_json(blobs['state.json'], ckpt_dir / 'state.json')
    tensors = _load_tensors(blobs['state.safetensors'], ckpt_dir / 'state.safetensors')
    try:
        state = _upgrade(join_tensors(doc, tensors))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f'{ckpt_dir / "state.json"} is not a valid state document (a '
                              f'tensor missing from state.safetensors, or a malformed key): '
                              f'{e!r}') from None
    model = None
    if 'model.safetensors' in blobs:
        model = _load_tensors(blobs['model.safetensors'], ckpt_dir / 'model.safetensors')
    manifest = _load_json(blobs.pop(MANIFEST), ckpt_dir / MANIFEST)
    world = manifest.get('world_size', (state.get('meta') or {}).get('world_size'))
    return {'model': model, 'state': state, 'rank': read_rank_state(ckpt_dir, blobs, rank),
            'world_size': world, 'files': blobs, 'path': str(ckpt_dir)}


def _upgrade(state: dict) -> dict:
    """A format-3 state's hooks (``hooks: {class name: state}``) under format 4's names
    (``hooks.<class name>``), so load_from and export still find an EMA average."""
    old = state.get('hooks')
    if isinstance(old, dict) and state.get('format_version', 0) < 4:
        for name, hook_state in old.items():
            state.setdefault(f'hooks.{name}', hook_state)
    return state


def read_rank_state(ckpt_dir: Path, blobs: dict, rank: int) -> dict:
    """Process ``rank``'s own state, ``{stem: state}``, from the verified files ``blobs``."""
    out = {}
    for name in blobs:
        m = re.fullmatch(rf'(\w+?)_{rank}\.safetensors', name)
        if not m:
            continue
        tensors = _load_tensors(blobs[name], ckpt_dir / name)
        doc_name = f'{m.group(1)}_{rank}.json'
        doc = (_load_json(blobs[doc_name], ckpt_dir / doc_name) if doc_name in blobs
               else {k: {'__tensor__': k} for k in tensors})
        try:
            out[m.group(1)] = join_tensors(doc, tensors)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f'{ckpt_dir / doc_name} refers to a tensor missing from '
                                  f'{name}: {e}') from None
    return out


def read_model_weights(path: Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint directory (verified) or a bare ``.safetensors`` file."""
    path = Path(path)
    if path.is_dir():
        return whole_weights(read_checkpoint(path))
    if path.suffix == '.safetensors' and path.is_file():
        return _load_tensors(_read(path), path)
    if not path.exists():
        raise CheckpointError(f'{path} does not exist: expected a checkpoint directory or a '
                              f'.safetensors file')
    raise CheckpointError(f'{path}: expected a checkpoint directory or a .safetensors file '
                          f'(pickled .pth/.bin files are refused: loading them can run code)')


def whole_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """A read checkpoint's model weights as whole tensors: ``model.safetensors``, or its
    sharded weights put together on this process."""
    if ckpt['model'] is not None:
        return ckpt['model']
    weights = ckpt['state'].get('model')
    if not isinstance(weights, dict) or not weights:
        raise CheckpointError(f'{ckpt["path"]} holds no model weights')
    return whole(ckpt, weights)


def whole(ckpt: dict, obj: Any) -> Any:
    """``obj`` (a part of a read checkpoint's state) with its sharded tensors read whole:
    every rank's shards put together on this process, no process group needed."""
    keys = sharded_keys(obj)
    if not keys:
        return obj
    from .sharded import load_shards
    loaded = load_shards(Path(ckpt['path']) / SHARDED_DIR, dict.fromkeys(keys), ckpt['path'])
    return join_tensors(obj, loaded)


def candidates(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories, the ``latest`` pointer's target first, then newest first.

    A symbolic link in ``ckpt_root`` is not one of them (it resolves elsewhere; the writer
    moves one aside when it needs the name), and a ``latest`` that is not a regular file (a
    directory, a FIFO, which would block the read) is not read."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    dirs = []
    for p in ckpt_root.iterdir():
        if p.name.startswith('.') or not p.is_dir():
            continue
        if p.is_symlink():
            warnings.warn(f'{p} is a symbolic link (to {os.readlink(p)!r}), not a checkpoint of '
                          f'this run: skipped (resume=PATH reads a checkpoint anywhere)')
            continue
        dirs.append(p)
    dirs.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
    latest = ckpt_root / LATEST
    if not os.path.lexists(latest):
        return dirs
    if not latest.is_file():
        kind = _kind(os.stat(latest).st_mode) if latest.exists() else 'a broken link'
        warnings.warn(f'{latest} is not a file ({kind}); using the newest complete checkpoint '
                      f'instead (the next save moves it aside)')
        return dirs
    try:
        name = latest.read_bytes().decode('utf-8').strip()
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f'{latest} is unreadable ({e}); using the newest complete checkpoint instead')
        return dirs
    target = ckpt_root / name
    if name and '/' not in name and target in dirs:
        dirs.remove(target)
        dirs.insert(0, target)
    else:
        warnings.warn(f'{latest} points at {name!r}, which is not a checkpoint here; '
                      f'using the newest complete checkpoint instead')
    return dirs


def find_resumable(ckpt_root: Path, rank: int = 0) -> dict:
    """Load the newest valid checkpoint, skipping damaged ones with a warning naming why."""
    tried = []
    for d in candidates(ckpt_root):
        try:
            return read_checkpoint(d, rank)
        except CheckpointError as e:
            warnings.warn(f'skipping checkpoint {d}: {e}')
            tried.append(f'{d.name}: {e}')
    detail = ('; '.join(tried)) if tried else 'no checkpoint directories found'
    raise CheckpointError(f'resume was requested but {ckpt_root} has no valid checkpoint ({detail}). '
                          f'Start a fresh run with resume=False, or pass resume=PATH.')
