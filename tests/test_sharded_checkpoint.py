"""Sharded (FSDP2) checkpoints on disk: real ``fully_shard`` over 2 gloo ranks
(``tests/parts/proto_sharded_job.py``), then the files themselves: no pickle or zip anywhere and
every shard a valid safetensors file; a missing rank's shards or a planted shard refuse the
checkpoint (and resume takes the previous one); a SIGKILL during a sharded save leaves the
previous checkpoint valid; ``scale-runner export`` puts the full weights together without
torch.distributed.

Two 2-rank jobs in all, started together, and one export process; every test reads their
files (copies of them where it damages one), so the file stays well under a minute."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import PARTS_DIR, pythonpath
from scale_runner.checkpoint import (CheckpointError, find_resumable, read_checkpoint,
                                     read_model_weights, verify)
from scale_runner.checkpoint.format import candidates

# DCP's note that a read without a process group is a single-process read (export, read_model_weights)
pytestmark = pytest.mark.filterwarnings('ignore:torch.distributed is disabled:UserWarning')

JOB = PARTS_DIR / 'proto_sharded_job.py'
SHARD = 'shard-{:05d}-model-00001-of-00001.safetensors'


def _env() -> dict:
    """This environment without any torch.distributed launch variables."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR',
                'MASTER_PORT', 'ACCELERATE_USE_CPU', 'TORCHELASTIC_RUN_ID'):
        env.pop(var, None)
    return env


def _launch(out: Path, mode: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / 'job.log', 'w') as log:
        return subprocess.Popen([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                                 '--nproc_per_node', '2', str(JOB), str(out), mode],
                                stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=out,
                                start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """End a job that is still running: SIGTERM first (torch.distributed.run then ends its
    workers, which run in sessions of their own), SIGKILL if that does not do it."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope='module')
def launched(tmp_path_factory):
    """Both jobs, started at once (their start-up, most of their time, overlaps)."""
    jobs = {}
    try:
        for mode in ('save', 'kill-rename'):
            out = tmp_path_factory.mktemp(mode)
            jobs[mode] = (out, _launch(out, mode))
        yield jobs
    finally:
        for _, proc in jobs.values():  # the export too, if started
            _stop(proc)


@pytest.fixture(scope='module')
def job(launched):
    """The ``save`` job: ``iter_2`` and ``iter_3`` complete; both ranks SIGKILLed from
    outside while they were in the save of ``iter_4``, their shards of it on disk."""
    out, proc = launched['save']
    markers = [out / f'in_save_{r}' for r in range(2)]
    deadline = time.monotonic() + 150
    while not all(m.exists() and m.read_text() for m in markers):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f'the job ended or hung before the save of iter_4 (rc {proc.poll()}):\n'
                        + (out / 'job.log').read_text())
        time.sleep(0.05)
    for m in markers:  # every rank at once, as a lost node would be
        os.kill(int(m.read_text()), signal.SIGKILL)
    proc.wait(timeout=60)
    log = (out / 'job.log').read_text()
    assert proc.returncode != 0, log
    assert all(f'SAVED_{n}_{r}' in log for n in (2, 3) for r in range(2)), log
    assert 'SAVED_4' not in log, log
    # the export of iter_3 (test 10) runs meanwhile, in a plain process: no torch.distributed
    export = out / 'export' / 'weights.safetensors'
    export.parent.mkdir()
    launched['export'] = (export, subprocess.Popen(
        [sys.executable, '-m', 'scale_runner', 'export', str(out / 'ckpts' / 'iter_3'), str(export)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=export.parent,
        start_new_session=True))
    return out


@pytest.fixture(scope='module')
def exported(job, launched):
    """``python -m scale_runner export CKPT OUT`` of iter_3 (started by ``job``)."""
    out, proc = launched['export']
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    return out


def _copy_root(job: Path, dst: Path) -> Path:
    """A copy of the job's complete checkpoints (iter_2, iter_3, latest) to damage."""
    root = dst / 'ckpts'
    root.mkdir(parents=True)
    for name in ('iter_2', 'iter_3'):
        shutil.copytree(job / 'ckpts' / name, root / name)
    shutil.copy2(job / 'ckpts' / 'latest', root / 'latest')
    return root


def _equal(got: dict, expected: dict) -> None:
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for k, v in expected.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k


def _check_safetensors(data: bytes, where: str) -> dict:
    """Parse a safetensors file by hand: an 8-byte little-endian header length, a JSON
    header, then exactly the bytes its entries' offsets cover, back to back."""
    assert len(data) >= 8, where
    n = int.from_bytes(data[:8], 'little')
    assert 0 < n <= len(data) - 8, where
    header = json.loads(data[8:8 + n])
    assert isinstance(header, dict), where
    sizes = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1,
             'U8': 1, 'BOOL': 1}
    spans = []
    for name, info in header.items():
        if name == '__metadata__':
            assert all(isinstance(v, str) for v in info.values()), where
            continue
        start, end = info['data_offsets']
        numel = 1
        for d in info['shape']:
            numel *= d
        assert end - start == numel * sizes[info['dtype']], f'{where}: {name}'
        spans.append((start, end))
    spans.sort()
    assert spans and spans[0][0] == 0 and spans[-1][1] == len(data) - 8 - n, where
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f'{where}: gaps or overlaps'
    return header


# ---- 6. no pickle, no zip; every shard valid safetensors ---------------------------------------
def test_no_file_of_a_sharded_checkpoint_is_a_pickle_or_zip_and_shards_are_safetensors(job):
    for name in ('iter_2', 'iter_3'):
        ckpt = job / 'ckpts' / name
        files = sorted(p for p in ckpt.rglob('*') if p.is_file())
        rel = {p.relative_to(ckpt).as_posix() for p in files}
        listed = set(json.loads((ckpt / 'manifest.json').read_text())['files'])
        assert rel == listed | {'manifest.json'}, rel ^ (listed | {'manifest.json'})
        assert {f'sharded/{SHARD.format(k)}' for k in (1, 2)} <= rel
        assert {'rng_0.safetensors', 'rng_1.safetensors', 'state.json', 'state.safetensors'} <= rel
        assert 'model.safetensors' not in rel  # no rank held the whole weights
        for p in files:
            data = p.read_bytes()
            assert not data.startswith(b'\x80'), f'{p} is a pickle'
            assert not data.startswith(b'PK'), f'{p} is a zip (torch.save) file'
            assert p.suffix in ('.safetensors', '.json'), p
            if p.suffix == '.json':
                json.loads(data)
            else:
                header = _check_safetensors(data, str(p))
                with safe_open(str(p), framework='pt') as f:  # and safetensors agrees
                    assert set(f.keys()) == set(header) - {'__metadata__'}
        for k in (1, 2):
            with safe_open(str(ckpt / 'sharded' / SHARD.format(k)), framework='pt') as f:
                assert 'DCP_SHARDING_INFO' in f.metadata()
                assert f.get_slice('model.0.weight').get_shape() == [8, 8]  # half of (16, 8)


# ---- 7. a missing rank's shards -------------------------------------------------------------
@pytest.mark.parametrize('rank', [1, 0])
def test_missing_rank_shard_is_refused_and_resume_takes_the_previous_checkpoint(job, tmp_path, rank):
    root = _copy_root(job, tmp_path)
    missing = root / 'iter_3' / 'sharded' / SHARD.format(rank + 1)
    missing.unlink()
    with pytest.raises(CheckpointError, match=rf"{missing.name} \(rank {rank}'s shards\) is "
                                              rf"listed in the manifest but missing"):
        read_checkpoint(root / 'iter_3')
    with pytest.warns(UserWarning, match=rf"skipping checkpoint .*iter_3.*rank {rank}'s shards"):
        ckpt = find_resumable(root)
    assert Path(ckpt['path']).name == 'iter_2'
    assert ckpt['state']['train_state']['iter'] == 2
    _equal(read_model_weights(root / 'iter_2'), load_file(job / 'expected_iter_2.safetensors'))


def test_missing_rank_rng_state_is_refused_naming_the_rank(job, tmp_path):
    root = _copy_root(job, tmp_path)
    (root / 'iter_3' / 'rng_1.safetensors').unlink()
    with pytest.raises(CheckpointError, match=r"rng_1.safetensors \(rank 1's rng state\)"):
        read_checkpoint(root / 'iter_3')


# ---- 8. a planted shard ---------------------------------------------------------------------
class _Bomb:
    def __reduce__(self):
        return (os.system, (f'touch {os.environ["PROTO_MARKER"]}',))


@pytest.mark.parametrize('planted', [SHARD.format(3), 'extra.safetensors', '.metadata'])
def test_planted_file_in_sharded_dir_refuses_the_checkpoint(job, tmp_path, monkeypatch, planted):
    root = _copy_root(job, tmp_path)
    ckpt = root / 'iter_3'
    target = ckpt / 'sharded' / planted
    if planted == '.metadata':  # DCP's own (pickled) metadata file name
        marker = tmp_path / 'unpickled'
        monkeypatch.setenv('PROTO_MARKER', str(marker))
        target.write_bytes(pickle.dumps(_Bomb()))
    else:  # a real shard: valid safetensors, readable by DCP's reader if it got that far
        shutil.copy2(ckpt / 'sharded' / SHARD.format(1), target)
    with pytest.raises(CheckpointError, match='holds files the manifest does not list'):
        verify(ckpt)
    with pytest.raises(CheckpointError, match=planted.replace('.', r'\.')):
        read_checkpoint(ckpt)
    with pytest.warns(UserWarning, match='skipping checkpoint .*iter_3'):
        assert Path(find_resumable(root)['path']).name == 'iter_2'
    if planted == '.metadata':
        assert not marker.exists(), 'the planted pickle was unpickled'


# ---- 9. SIGKILL during a sharded save ---------------------------------------------------------
def test_sigkill_during_a_sharded_save_leaves_the_previous_checkpoint_valid(job):
    root = job / 'ckpts'
    assert (root / 'latest').read_text().strip() == 'iter_3'
    assert not (root / 'iter_4').exists()
    partial = root / '.tmp-iter_4'
    assert partial.is_dir() and {p.name for p in (partial / 'sharded').iterdir()} == {
        SHARD.format(1), SHARD.format(2)}  # the killed save's shards were on disk
    with pytest.raises(CheckpointError, match='manifest.json is missing'):
        read_checkpoint(partial)  # C is not a valid checkpoint
    assert [p.name for p in candidates(root)] == ['iter_3', 'iter_2']
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # nothing to skip: the newest complete one is taken
        ckpt = find_resumable(root)
    assert Path(ckpt['path']).name == 'iter_3' and ckpt['state']['train_state']['iter'] == 3
    for name in ('iter_2', 'iter_3'):
        _equal(read_model_weights(root / name), load_file(job / f'expected_{name}.safetensors'))


@pytest.fixture(scope='module')
def renamed_job(launched):
    """The ``kill-rename`` job: ``last`` saved, then saved again; rank 0 SIGKILLed right
    after the swap, before the old copy was removed."""
    out, proc = launched['kill-rename']
    rc = proc.wait(timeout=150)
    log = (out / 'job.log').read_text()
    assert rc != 0 and 'SAVED_2_0' in log and 'SAVED_3_0' not in log, log
    return out


def test_sigkill_while_a_checkpoint_replaces_one_of_the_same_name_loses_neither(renamed_job):
    """Saving ``last`` again swaps ``.tmp-last`` and ``last`` in one step (renameat2's
    RENAME_EXCHANGE), so a kill at any point leaves a complete checkpoint under the name that
    resume finds (the old one, or the new one). (With two renames, a kill between them left
    only ``.old-last``, and resume found nothing.)"""
    root = renamed_job / 'ckpts'
    on_disk = sorted(p.name for p in root.iterdir())
    assert (root / 'latest').read_text().strip() == 'last'
    try:
        ckpt = find_resumable(root)
    except CheckpointError as e:
        complete = []
        for p in root.iterdir():
            try:
                verify(p)
                complete.append(p.name)
            except CheckpointError:
                pass
        pytest.fail(f'no checkpoint is found after the kill, though {complete} on disk '
                    f'({on_disk}) are complete: {e}')
    step = ckpt['state']['train_state']['iter']
    assert step in (2, 3)
    _equal(read_model_weights(Path(ckpt['path'])),
           load_file(renamed_job / f'expected_iter_{step}.safetensors'))


# ---- 10. export --------------------------------------------------------------------------------
def test_export_of_a_sharded_checkpoint_writes_the_full_weights(job, exported):
    expected = load_file(job / 'expected_iter_3.safetensors')
    got = load_file(exported)
    _equal(got, expected)
    assert got['0.weight'].shape == (16, 8)  # the full tensor, not one rank's shard
    with safe_open(str(exported), framework='pt') as f:
        meta = f.metadata()
    assert meta['format'] == 'pt' and meta['iter'] == '3' and meta['source'] == 'iter_3'
    assert 'DCP_SHARDING_INFO' not in meta
    assert [p.name for p in exported.parent.iterdir()] == [exported.name]  # no temp file left
