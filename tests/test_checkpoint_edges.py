"""Checkpoint edge cases (issue 15): a full disk, links out of a checkpoint, debris under the
names the writer uses. Nothing already saved is ever lost."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import PARTS_DIR
from scale_runner import Runner
from scale_runner.checkpoint import CheckpointError, find_resumable, read_checkpoint


def _train(tmp_path, tiny_parts, max_iters=4, resume=False, **ckpt):
    parts = tiny_parts(tmp_path, train_cfg=dict(by_epoch=False, max_iters=max_iters),
                       val_cfg=None, val_dataloader=None, val_evaluator=None, resume=resume,
                       default_hooks=dict(checkpoint=dict(interval=2, max_keep_ckpts=-1, **ckpt)))
    with Runner(**parts) as runner:
        runner.train()
    return runner


def _latest(root: Path) -> str:
    return (root / 'latest').read_text().strip()


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE: a write past ``nbytes`` of any file fails with EFBIG (SIGXFSZ ignored):
    real I/O failing as it does on a full disk, without filling one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _writer():
    from accelerate import Accelerator
    from scale_runner.checkpoint import CheckpointWriter
    return CheckpointWriter(Accelerator(cpu=True))


BIG = {'w': torch.arange(65536, dtype=torch.float32)}  # 256 KiB: past a 64 KiB limit


def _state(i: int) -> dict:
    return {'train_state': {'iter': i}, 'note': 'x' * 100}


def _temporaries(root: Path) -> list[str]:
    return [p.name for p in root.iterdir() if p.name.startswith('.')]


# ---- a full disk ------------------------------------------------------------------------------
def test_disk_full_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, tiny_parts):
    """Real I/O past a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG as they would with
    ENOSPC): the error says which checkpoint, how much it needed, what is free and intact."""
    runner = _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    assert _latest(root) == 'iter_4'
    with file_size_limit(64), pytest.raises(CheckpointError) as err:  # every file is larger
        runner.save_checkpoint(root / 'iter_5')
    msg = str(err.value)
    assert f'saving checkpoint {root / "iter_5"} failed' in msg, msg
    assert "File too large: 'rng_0.safetensors'" in msg, msg  # the file, and the error
    assert re.search(r'it needed about [\d,]+ bytes( \([\d.]+ KiB\))? in all', msg), msg
    assert ' are free on the file system of ' in msg, msg
    assert f'the previous checkpoint {root / "iter_4"} is intact (latest still points at it)' in msg
    assert not _temporaries(root), 'temporary dir left'
    assert not (root / 'iter_5').exists() and _latest(root) == 'iter_4'
    assert read_checkpoint(root / 'iter_4')['state']['train_state']['iter'] == 4  # verified


def test_a_full_disk_while_the_weights_are_written(tmp_path):
    """The small files fit, the model file does not: safetensors' own error (a SafetensorError
    wrapping EFBIG) is reported as the file and the system error; the size counts the weights."""
    root = tmp_path / 'checkpoints'
    writer = _writer()
    writer.write(root / 'iter_1', BIG, _state(1))
    with file_size_limit(64 << 10), pytest.raises(CheckpointError) as err:
        writer.write(root / 'iter_2', BIG, _state(2))
    msg = str(err.value)
    assert "rank 0: OSError: [Errno 27] File too large: 'model.safetensors'" in msg, msg
    needed = int(msg.split('it needed about ')[1].split(' bytes')[0].replace(',', ''))
    assert 65536 * 4 < needed < 65536 * 4 + 4096, msg
    assert f'the previous checkpoint {root / "iter_1"} is intact' in msg, msg
    assert sorted(p.name for p in root.iterdir()) == ['iter_1', 'latest']  # no temporary dir
    assert _latest(root) == 'iter_1'
    assert read_checkpoint(root / 'iter_1')['state']['train_state']['iter'] == 1


def test_no_space_left_as_safetensors_reports_it(tmp_path, monkeypatch):
    """ENOSPC as safetensors raises it: the file, errno 28 and its text; no earlier checkpoint."""
    from safetensors import SafetensorError
    from scale_runner.checkpoint import format as checkpoint
    real = checkpoint.save_file

    def full(tensors, path, *a, **k):
        if Path(path).name == 'state.safetensors':
            Path(path).write_bytes(b'partial')
            raise SafetensorError('Error while serializing: I/O error: No space left on device '
                                  '(os error 28)')
        return real(tensors, path, *a, **k)
    monkeypatch.setattr(checkpoint, 'save_file', full)
    root = tmp_path / 'checkpoints'
    with pytest.raises(CheckpointError) as err:
        _writer().write(root / 'iter_1', BIG, _state(1))
    msg = str(err.value)
    assert f"[Errno {errno.ENOSPC}] No space left on device: 'state.safetensors'" in msg, msg
    assert 'no earlier checkpoint was written' in msg, msg
    assert list(root.iterdir()) == []


def test_a_failed_fsync_fails_the_save(tmp_path, monkeypatch):
    """fsync runs in a thread beside the checksum: its error (EIO, ENOSPC at write-back) is
    not lost, so an undurable file is never declared complete."""
    root = tmp_path / 'checkpoints'
    real = os.fsync

    def fsync(fd):
        if os.readlink(f'/proc/self/fd/{fd}').endswith('model.safetensors'):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)
    monkeypatch.setattr(os, 'fsync', fsync)
    with pytest.raises(CheckpointError, match=r"Input/output error: 'model.safetensors'"):
        _writer().write(root / 'iter_1', BIG, _state(1))
    assert list(root.iterdir()) == []


def test_a_failed_update_of_latest_says_the_checkpoint_is_complete(tmp_path, monkeypatch):
    root = tmp_path / 'checkpoints'
    writer = _writer()
    writer.write(root / 'iter_1', BIG, _state(1))
    from scale_runner.checkpoint import format as checkpoint
    real = checkpoint._write

    def full(path, data):
        if path.name == '.latest.tmp':
            path.write_bytes(data[:1])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, data)
    monkeypatch.setattr(checkpoint, '_write', full)
    with pytest.raises(CheckpointError) as err:
        writer.write(root / 'iter_2', BIG, _state(2))
    msg = str(err.value)
    assert f'checkpoint {root / "iter_2"} was written completely, but pointing' in msg, msg
    assert 'latest still points at iter_1' in msg and "resume='" in msg, msg
    assert _latest(root) == 'iter_1' and not _temporaries(root)
    assert read_checkpoint(root / 'iter_2')['state']['train_state']['iter'] == 2


def test_a_state_that_cannot_be_stored_leaves_no_temporary_directory(tmp_path):
    root = tmp_path / 'checkpoints'
    with pytest.raises(CheckpointError, match='cannot store object'):
        _writer().write(root / 'iter_1', BIG, {'bad': object()})
    assert list(root.iterdir()) == []


RANK_FAILS = PARTS_DIR / 'rank_fails_job.py'


def test_one_ranks_full_disk_stops_every_rank_without_a_hang(tmp_path):
    """2 processes (gloo): rank 1 cannot write its partial gradients; both ranks raise the same
    CheckpointError (rank 0 does not wait for rank 1 at a barrier), nothing of iter_2 is left."""
    script = RANK_FAILS
    root = tmp_path / 'checkpoints'
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(script), str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**env, 'OMP_NUM_THREADS': '1', 'ACCELERATE_USE_CPU': '1'})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    for rank in (0, 1):  # the same error on both (the free space is measured by each)
        msg = (tmp_path / f'rank{rank}.txt').read_text()
        assert "(rank 1: OSError: [Errno 27] File too large: 'grad_1.safetensors')" in msg, msg
        assert 'it needed about 524,' in msg, msg  # both ranks' 256 KiB of gradients
        assert f'the previous checkpoint {root / "iter_1"} is intact' in msg, msg
    assert sorted(p.name for p in root.iterdir()) == ['iter_1', 'latest']
    assert _latest(root) == 'iter_1'
    assert read_checkpoint(root / 'iter_1', rank=1)['rank']['grad']['g'].shape == (65536,)


# ---- links and non-regular files --------------------------------------------------------------
def test_a_symlink_out_of_the_checkpoint_is_refused_before_anything_is_opened(tmp_path, tiny_parts,
                                                                               monkeypatch):
    _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    outside = tmp_path / 'outside.safetensors'
    weights = root / 'iter_4' / 'model.safetensors'
    outside.write_bytes(weights.read_bytes())  # a valid file, with the same bytes
    weights.unlink()
    weights.symlink_to(outside)
    from scale_runner.checkpoint import format as checkpoint
    opened, mapped = [], []
    real_open, real_read = os.open, checkpoint._read

    def recording_open(path, *a, **k):
        opened.append(Path(path).name)
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, 'open', recording_open)
    monkeypatch.setattr(checkpoint, '_read',
                        lambda p, **k: mapped.append(Path(p).name) or real_read(p, **k))
    with pytest.raises(CheckpointError, match=r'model\.safetensors is a symbolic link'):
        read_checkpoint(root / 'iter_4')
    # only the manifest was read (to learn the file names); no listed file was opened
    assert mapped == ['manifest.json'] and opened == ['manifest.json'], (mapped, opened)
    with pytest.warns(UserWarning, match='symbolic link'):
        ckpt = find_resumable(root)  # falls back to the previous complete checkpoint
    assert ckpt['path'].endswith('iter_2')
    assert 'outside.safetensors' not in opened and opened.count('model.safetensors') == 1  # iter_2's


def test_a_fifo_in_place_of_a_file_is_refused_without_blocking(tmp_path, tiny_parts):
    _train(tmp_path, tiny_parts)
    state = tmp_path / 'checkpoints' / 'iter_4' / 'state.json'
    state.unlink()
    os.mkfifo(state)  # opening it for reading would block forever
    with pytest.raises(CheckpointError, match='is not a regular file'):
        read_checkpoint(state.parent)


# ---- debris under the writer's names -----------------------------------------------------------
def test_latest_replaced_by_a_directory_is_moved_aside_and_training_goes_on(tmp_path, tiny_parts):
    _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    (root / 'latest').unlink()
    (root / 'latest').mkdir()
    (root / 'latest' / 'notes.txt').write_text('user data')
    with pytest.warns(UserWarning):
        _train(tmp_path, tiny_parts, max_iters=8, resume=True)
    assert (root / 'latest').is_file() and _latest(root) == 'iter_8'
    debris = [p for p in root.iterdir() if p.name.startswith('latest.debris-')]
    assert len(debris) == 1 and (debris[0] / 'notes.txt').read_text() == 'user data'
    assert {'iter_2', 'iter_4', 'iter_6', 'iter_8'} <= {p.name for p in root.iterdir()}


@pytest.mark.parametrize('kind', ['file', 'foreign dir', 'link'])
def test_a_checkpoint_name_occupied_by_debris_is_stepped_around(tmp_path, tiny_parts, kind):
    _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    target = root / 'iter_6'  # the resumed run's next save
    if kind == 'file':
        target.write_text('not a checkpoint')
    elif kind == 'foreign dir':
        target.mkdir()
        (target / 'data.bin').write_bytes(b'x')
    else:
        target.symlink_to(root / 'iter_2', target_is_directory=True)  # a valid one, elsewhere
    with pytest.warns(UserWarning, match='in the way of a checkpoint'):
        _train(tmp_path, tiny_parts, max_iters=8, resume=True)
    assert _latest(root) == 'iter_8'
    assert read_checkpoint(root / 'iter_6')['state']['train_state']['iter'] == 6
    assert not (root / 'iter_6').is_symlink()
    debris = [p for p in root.iterdir() if p.name.startswith('iter_6.debris-')]
    assert len(debris) == 1
    if kind == 'file':
        assert debris[0].read_text() == 'not a checkpoint'
    elif kind == 'foreign dir':
        assert (debris[0] / 'data.bin').read_bytes() == b'x'
    read_checkpoint(root / 'iter_2')  # the link's target: still there and valid


def test_latest_as_a_fifo_is_not_read_and_the_next_save_replaces_it(tmp_path, tiny_parts):
    _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    (root / 'latest').unlink()
    os.mkfifo(root / 'latest')  # reading it would block forever
    signal.alarm(30)  # a regression fails the test instead of hanging the suite
    try:
        with pytest.warns(UserWarning, match='is not a file'):
            assert find_resumable(root)['path'].endswith('iter_4')
        with pytest.warns(UserWarning, match='in the way of a checkpoint'):
            _train(tmp_path, tiny_parts, max_iters=6, resume=True)
    finally:
        signal.alarm(0)
    assert (root / 'latest').is_file() and _latest(root) == 'iter_6'
    assert len(list(root.glob('latest.debris-*'))) == 1


def test_a_linked_checkpoint_directory_is_not_resumed_by_discovery(tmp_path, tiny_parts):
    _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    elsewhere = tmp_path / 'elsewhere'
    (root / 'iter_4').rename(elsewhere)
    (root / 'iter_4').symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(UserWarning, match='iter_4 is a symbolic link'):
        assert find_resumable(root)['path'].endswith('iter_2')
    assert read_checkpoint(root / 'iter_4')['state']['train_state']['iter'] == 4  # by path: read


def test_retention_never_deletes_debris_named_like_a_preemption_checkpoint(tmp_path, tiny_parts):
    root = tmp_path / 'checkpoints'
    debris = root / 'preempt_iter_3.debris-20260101_000000-1'
    debris.mkdir(parents=True)
    (debris / 'notes.txt').write_text('kept')
    (root / 'preempt_iter_1').mkdir()  # a preemption checkpoint, older than the new ones: dropped
    _train(tmp_path, tiny_parts)
    assert (debris / 'notes.txt').read_text() == 'kept'
    assert not (root / 'preempt_iter_1').exists()
