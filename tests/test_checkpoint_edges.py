"""Checkpoint edge cases (issue 15): a full disk, links out of a checkpoint, debris under the
names the writer uses. Nothing already saved is ever lost."""
from __future__ import annotations

import os
import resource
import signal
from pathlib import Path

import pytest

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


# ---- a full disk ------------------------------------------------------------------------------
def test_disk_full_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, tiny_parts):
    """Real I/O past a file-size limit (RLIMIT_FSIZE: writes fail with EFBIG as they would with
    ENOSPC): the error says which checkpoint, how much it needed, what is free and intact."""
    runner = _train(tmp_path, tiny_parts)
    root = tmp_path / 'checkpoints'
    assert _latest(root) == 'iter_4'
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))  # bytes: every tensor file is larger
    try:
        with pytest.raises(CheckpointError) as err:
            runner.save_checkpoint(root / 'iter_5')
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    msg = str(err.value)
    assert f'saving checkpoint {root / "iter_5"} failed' in msg and 'File too large' in msg, msg
    assert 'MiB of tensors' in msg and 'MiB free' in msg, msg
    assert f'the previous checkpoint {root / "iter_4"} is intact' in msg, msg
    assert not [p.name for p in root.iterdir() if p.name.startswith('.')], 'temporary dir left'
    assert not (root / 'iter_5').exists() and _latest(root) == 'iter_4'
    assert read_checkpoint(root / 'iter_4')['state']['train_state']['iter'] == 4  # verified


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
    from scale_runner import checkpoint
    opened = []
    real_read = checkpoint._read
    monkeypatch.setattr(checkpoint, '_read', lambda p: opened.append(Path(p).name) or real_read(p))
    with pytest.raises(CheckpointError, match=r'model\.safetensors is a symbolic link'):
        read_checkpoint(root / 'iter_4')
    assert opened == [], f'opened before refusing: {opened}'
    with pytest.warns(UserWarning, match='symbolic link'):
        ckpt = find_resumable(root)  # falls back to the previous complete checkpoint
    assert ckpt['path'].endswith('iter_2')


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
