"""Checkpoints written in the background (issue 18, part 2): ``checkpoint.async_save=True``."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARTS_DIR, pythonpath
from scale_runner import Runner
from scale_runner.checkpoint import CheckpointError, find_resumable, read_checkpoint
from sr_models import PlainRegressor


def _parts(tiny_parts, work, **over):
    torch.manual_seed(0)
    ckpt = {'interval': 1, 'max_keep_ckpts': 2, **over.pop('ckpt', {})}
    return tiny_parts(work, model=PlainRegressor(), train_cfg=dict(by_epoch=False, max_iters=12,
                                                                   val_interval=6),
                      optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
                      default_hooks=dict(checkpoint=ckpt), log_level='INFO', **over)


def _run(parts):
    with Runner(**parts) as runner:
        runner.train()
    return runner


def test_background_checkpoints_equal_synchronous_ones_and_resume_exactly(tmp_path, tiny_parts):
    sync = _run(_parts(tiny_parts, tmp_path / 'sync'))
    both = _run(_parts(tiny_parts, tmp_path / 'async', ckpt=dict(async_save=True)))
    assert both._pending_checkpoint is None  # the end of training waited for the last one
    for name in ('iter_11', 'iter_12'):  # the same files, the same tensors, the same state
        a, b = (read_checkpoint(r.checkpoint_dir / name) for r in (sync, both))
        assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
        assert a['state']['train_state'] == b['state']['train_state']
        assert a['state']['hooks.checkpoint'] == b['state']['hooks.checkpoint']
    # retention ran after each background write: only the newest two are kept
    assert sorted(p.name for p in both.checkpoint_dir.iterdir()) == ['iter_11', 'iter_12', 'latest']
    log = (both.log_dir / f'{both.experiment_name}.log').read_text()
    assert 'saving checkpoint' in log and 'in the background' in log
    # resume from an iteration checkpoint written in the background: bit for bit
    work = tmp_path / 'resumed'
    _run(_parts(tiny_parts, work, ckpt=dict(async_save=True, max_keep_ckpts=-1)))
    for p in work.joinpath('checkpoints').iterdir():  # keep iteration 5 only: resume from it
        if p.name not in ('iter_5', 'latest'):
            shutil.rmtree(p)
    (work / 'checkpoints' / 'latest').write_text('iter_5\n')
    _run(_parts(tiny_parts, work, resume=True, ckpt=dict(async_save=True)))
    want = load_file(sync.checkpoint_dir / 'iter_12' / 'model.safetensors')
    got = load_file(work / 'checkpoints' / 'iter_12' / 'model.safetensors')
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_a_failed_background_write_stops_the_run_at_the_next_iteration(tmp_path, tiny_parts,
                                                                       monkeypatch):
    from scale_runner.checkpoint import format as fmt
    real = fmt._write_tensors

    def full_disk(path, tensors, io):
        if path.parent.name == '.tmp-iter_4':
            raise OSError(28, 'No space left on device', path.name)
        return real(path, tensors, io)
    monkeypatch.setattr(fmt, '_write_tensors', full_disk)
    runner = Runner(**_parts(tiny_parts, tmp_path, ckpt=dict(async_save=True)))
    with pytest.raises(CheckpointError, match='iter_4') as err:
        runner.train()
    runner.close()
    assert 'No space left on device' in str(err.value)
    assert runner.iter in (5, 6)  # reported at an iteration boundary right after, not lost
    assert find_resumable(runner.checkpoint_dir)['path'].endswith('iter_3')
    assert not (runner.checkpoint_dir / '.tmp-iter_4').exists()


SLOW_WRITE = PARTS_DIR / 'async_slow_write.py'


def test_sigkill_during_a_background_write_leaves_the_previous_checkpoint(tmp_path):
    script = SLOW_WRITE
    work = tmp_path / 'work'
    proc = subprocess.Popen([sys.executable, str(script), str(work)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=pythonpath()))
    try:
        deadline = time.monotonic() + 60
        line = ''
        while 'WRITING' not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
        assert 'WRITING' in line
        time.sleep(0.3)  # training goes on meanwhile (the write is in the background)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    ckpt = find_resumable(work / 'checkpoints')
    assert ckpt['path'].endswith('iter_2') and ckpt['state']['train_state']['iter'] == 2
    assert not (work / 'checkpoints' / 'iter_3').exists()
