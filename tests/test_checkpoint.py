"""Checkpoints: pickle-free format, manifest, exact resume, fallback, load_from, pickle safety."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save_file
from torch import nn

from conftest import CountingData, PlainRegressor
from scale_runner import Hook, Runner
from scale_runner.checkpoint import (CheckpointError, find_resumable, read_checkpoint,
                                     read_model_weights)


def _final_weights(runner) -> dict[str, torch.Tensor]:
    from scale_runner.model import unwrap
    return {k: v.detach().clone() for k, v in unwrap(runner.model).state_dict().items()}


def _train(parts):
    runner = Runner(**parts)
    runner.train()
    runner.close()
    return runner


def _resume_parts(tiny_parts, work_dir, **over):
    """Epoch-based, shuffled, SGD with momentum and a step schedule."""
    torch.manual_seed(0)  # the model is built outside the runner: same initial weights every time
    parts = tiny_parts(
        work_dir,
        model=PlainRegressor(),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        param_scheduler=dict(type='StepLR', step_size=3, gamma=0.5, by_epoch=False),
    )
    parts.update(over)
    return parts


# ---- format ----------------------------------------------------------------------------------
def test_checkpoint_dir_holds_only_safetensors_and_json_with_full_manifest(tmp_path, tiny_parts):
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1)))
    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    files = sorted(p.name for p in ckpt.iterdir())
    assert all(p.is_file() for p in ckpt.iterdir()), files
    # every file gets the same permissions (safetensors alone would create 0600 files)
    assert len({p.stat().st_mode for p in ckpt.iterdir()}) == 1
    assert all(n.endswith(('.safetensors', '.json')) for n in files), files
    assert {'manifest.json', 'model.safetensors', 'state.json', 'state.safetensors'} <= set(files)
    for p in ckpt.iterdir():
        head = p.read_bytes()[:1]
        assert head != b'\x80', f'{p.name} is a pickle'
        # no zip-wrapped torch.save either
        assert not p.read_bytes().startswith(b'PK'), f'{p.name} is a zip (torch.save) file'
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    listed = manifest['files']
    assert set(listed) == set(files) - {'manifest.json'}
    for name, entry in listed.items():
        data = (ckpt / name).read_bytes()
        assert entry['size'] == len(data)
        assert entry['xxh3_64'] == [xxhash.xxh3_64_hexdigest(data)]  # small files: one piece
    assert (tmp_path / 'checkpoints' / 'latest').read_text().strip() == 'epoch_1'
    # the optimizer's momentum buffers are in the checkpoint, as tensors
    state = read_checkpoint(ckpt)['state']
    assert state['optim_wrapper']['state'], 'optimizer state (momentum) was not saved'
    assert state['train_state']['epoch'] == 1 and state['train_state']['iter'] == 8


def test_save_makes_everything_durable_before_it_becomes_visible(tmp_path, monkeypatch):
    """The crash-safety order, with the fsyncs that run at once: every file's bytes before the
    manifest's; the manifest and the directory's entries before the rename into place; the
    rename and the new pointer before ``latest`` is replaced, and that replace last."""
    import threading
    from accelerate import Accelerator
    from scale_runner.checkpoint import CheckpointWriter
    events, lock = [], threading.Lock()
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        real_fsync(fd)
        with lock:
            events.append(('fsync', os.readlink(f'/proc/self/fd/{fd}')))

    def move(real, kind):
        def f(src, dst):
            real(src, dst)
            with lock:
                events.append((kind, str(src)))
        return f
    monkeypatch.setattr(os, 'fsync', fsync)
    monkeypatch.setattr(os, 'rename', move(real_rename, 'rename'))
    monkeypatch.setattr(os, 'replace', move(real_replace, 'replace'))
    model = PlainRegressor()
    opt = torch.optim.AdamW(model.parameters())
    root = tmp_path / 'checkpoints'
    from scale_runner.checkpoint.state import rng_state
    CheckpointWriter(Accelerator(cpu=True)).write(root / 'iter_1', model.state_dict(),
                                                  {'optimizer': opt.state_dict()}, {'rng': rng_state()})
    tmp, parent = str(root / '.tmp-iter_1'), str(root)
    at = {e: i for i, e in enumerate(events)}  # the last time each event happened
    files = [e for e in events if e[0] == 'fsync' and e[1].startswith(tmp + '/')]
    manifest = ('fsync', f'{tmp}/manifest.json')
    assert {Path(f).name for _, f in files} == {'rng_0.safetensors', 'rng_0.json', 'model.safetensors',
                                               'state.safetensors', 'state.json', 'manifest.json'}
    assert all(at[f] < at[manifest] for f in files if f != manifest)
    assert max(at[manifest], at[('fsync', tmp)]) < at[('rename', tmp)]
    pointer = f'{parent}/.latest.tmp'
    parent_syncs = [i for i, e in enumerate(events) if e == ('fsync', parent)]
    replace = at[('replace', pointer)]
    assert at[('rename', tmp)] < parent_syncs[0] < replace  # the rename is durable first
    assert at[('fsync', pointer)] < replace                 # so are the pointer's bytes
    assert replace < parent_syncs[-1] == len(events) - 1    # and the replace itself, last


def test_large_files_are_checked_in_pieces_and_any_damaged_piece_is_found(tmp_path, tiny_parts,
                                                                         monkeypatch):
    import scale_runner.checkpoint.format as ck
    monkeypatch.setattr(ck, 'CHECKSUM_CHUNK', 64)  # the real size is 32 MiB: make the files big
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1)))
    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    entry = json.loads((ckpt / 'manifest.json').read_text())['files']['state.safetensors']
    data = (ckpt / 'state.safetensors').read_bytes()
    assert entry['chunk_size'] == 64 and len(data) > 2 * 64
    assert entry['xxh3_64'] == [xxhash.xxh3_64_hexdigest(data[a:a + 64]) for a in range(0, len(data), 64)]
    before = read_checkpoint(ckpt)['state']['optim_wrapper']
    # The pieces are checked with the manifest's own piece size, whatever the default is now.
    monkeypatch.setattr(ck, 'CHECKSUM_CHUNK', 1 << 20)
    assert read_checkpoint(ckpt)['state']['optim_wrapper'].keys() == before.keys()
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 1  # one bit in a middle piece
    (ckpt / 'state.safetensors').write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match='state.safetensors is damaged: its checksum differs'):
        read_checkpoint(ckpt)


def _crc32_entry(data: bytes) -> dict:  # format 2: CRC-32 of every 64-byte piece
    return {'size': len(data), 'chunk_size': 64,
            'crc32': [zlib.crc32(data[a:a + 64]) for a in range(0, len(data), 64)]}


def _sha256_entry(data: bytes) -> dict:  # format 1: sha256 of the whole file
    return {'size': len(data), 'sha256': hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize('version, entry', [(2, _crc32_entry), (1, _sha256_entry)])
def test_older_format_manifests_still_load_and_still_catch_damage(tmp_path, tiny_parts, version,
                                                                  entry):
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1)))
    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    expected = read_checkpoint(ckpt)['model']
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    for name in manifest['files']:
        manifest['files'][name] = entry((ckpt / name).read_bytes())
    manifest['format_version'] = version
    (ckpt / 'manifest.json').write_text(json.dumps(manifest))
    loaded = read_checkpoint(ckpt)['model']
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    data = bytearray((ckpt / 'model.safetensors').read_bytes())
    data[-1] ^= 1
    (ckpt / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match='model.safetensors is damaged: its checksum differs'):
        read_checkpoint(ckpt)


# ---- exact resume ----------------------------------------------------------------------------
def test_epoch_resume_is_bit_identical(tmp_path, tiny_parts):
    full = _train(_resume_parts(tiny_parts, tmp_path / 'full',
                                train_cfg=dict(by_epoch=True, max_epochs=3)))
    expected = _final_weights(full)

    work = tmp_path / 'split'
    _train(_resume_parts(tiny_parts, work, train_cfg=dict(by_epoch=True, max_epochs=1)))
    resumed = _train(_resume_parts(tiny_parts, work, resume=True,
                                   train_cfg=dict(by_epoch=True, max_epochs=3)))
    assert resumed.epoch == 3 and resumed.iter == 24
    got = _final_weights(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k
    # the saved final checkpoints agree byte for byte too
    a = (tmp_path / 'full' / 'checkpoints' / 'epoch_3' / 'model.safetensors').read_bytes()
    b = (work / 'checkpoints' / 'epoch_3' / 'model.safetensors').read_bytes()
    assert a == b


def test_epoch_resume_with_adamw_is_bit_identical(tmp_path, tiny_parts):
    over = dict(optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01)),
                param_scheduler=dict(type='LinearLR', start_factor=0.2, by_epoch=False, end=10))
    full = _train(_resume_parts(tiny_parts, tmp_path / 'full', **over,
                                train_cfg=dict(by_epoch=True, max_epochs=2)))
    work = tmp_path / 'split'
    _train(_resume_parts(tiny_parts, work, **over, train_cfg=dict(by_epoch=True, max_epochs=1)))
    resumed = _train(_resume_parts(tiny_parts, work, **over, resume=True,
                                   train_cfg=dict(by_epoch=True, max_epochs=2)))
    expected, got = _final_weights(full), _final_weights(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def _iter_parts(tiny_parts, work_dir, max_iters, data, **over):
    # 64 samples / batch 8 = 8 batches per pass; checkpoints every 5 iterations (not aligned)
    return _resume_parts(
        tiny_parts, work_dir,
        train_dataloader=dict(dataset=data, batch_size=8,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1000),
        default_hooks=dict(checkpoint=dict(interval=5, by_epoch=False)),
        **over)


def test_mid_epoch_resume_iter_based_is_exact_and_skips_at_the_sampler(tmp_path, tiny_parts):
    full_data = CountingData(64)
    full = _train(_iter_parts(tiny_parts, tmp_path / 'full', 14, full_data))
    expected = _final_weights(full)
    # Accelerate's prepared dataloader reads one batch ahead (to know the end of a pass)
    assert 14 * 8 <= len(full_data.reads) <= 15 * 8

    work = tmp_path / 'split'
    _train(_iter_parts(tiny_parts, work, 10, CountingData(64)))
    # iteration 10 = pass 1 (the second pass), 2 batches into it
    assert (work / 'checkpoints' / 'iter_10' / 'manifest.json').is_file()
    data = CountingData(64)
    resumed = _train(_iter_parts(tiny_parts, work, 14, data, resume=True))
    assert resumed.iter == 14
    # only the remaining 4 batches were read (+ at most Accelerate's one-batch lookahead), and
    # they are the very samples, in the same order, that the full run read at those positions
    assert 4 * 8 <= len(data.reads) <= 5 * 8, f'resume read {len(data.reads)} samples'
    assert data.reads == full_data.reads[10 * 8:10 * 8 + len(data.reads)]
    got = _final_weights(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


def test_mid_epoch_resume_in_first_pass_reads_only_remaining(tmp_path, tiny_parts):
    full_data = CountingData(64)
    full = _train(_iter_parts(tiny_parts, tmp_path / 'full', 7, full_data))
    work = tmp_path / 'split'
    _train(_iter_parts(tiny_parts, work, 5, CountingData(64)))
    data = CountingData(64)
    resumed = _train(_iter_parts(tiny_parts, work, 7, data, resume=True))
    assert 2 * 8 <= len(data.reads) <= 3 * 8, f'resume read {len(data.reads)} samples'
    assert data.reads == full_data.reads[5 * 8:5 * 8 + len(data.reads)]
    expected, got = _final_weights(full), _final_weights(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


# ---- damaged checkpoints -------------------------------------------------------------------
@pytest.fixture
def two_checkpoints(tmp_path, tiny_parts):
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=2)))
    root = tmp_path / 'checkpoints'
    assert (root / 'latest').read_text().strip() == 'epoch_2'
    return root


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize('damage', ['flip_model', 'no_manifest', 'truncate_state'])
def test_damaged_newest_falls_back_with_warning(two_checkpoints, damage):
    newest = two_checkpoints / 'epoch_2'
    if damage == 'flip_model':
        _flip_byte(newest / 'model.safetensors')
        culprit = 'model.safetensors'
    elif damage == 'no_manifest':
        (newest / 'manifest.json').unlink()
        culprit = 'manifest.json'
    else:
        p = newest / 'state.safetensors'
        p.write_bytes(p.read_bytes()[:-7])
        culprit = 'state.safetensors'
    with pytest.warns(UserWarning, match=culprit):
        ckpt = find_resumable(two_checkpoints)
    assert Path(ckpt['path']).name == 'epoch_1'
    assert ckpt['state']['train_state']['epoch'] == 1


def test_garbled_latest_pointer_falls_back(two_checkpoints):
    (two_checkpoints / 'latest').write_bytes(b'\xff\xfe garbage \x00')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ckpt = find_resumable(two_checkpoints)
    assert any('latest' in str(w.message) for w in caught), [str(w.message) for w in caught]
    assert Path(ckpt['path']).name == 'epoch_2'


def test_latest_pointing_nowhere_falls_back(two_checkpoints):
    (two_checkpoints / 'latest').write_text('epoch_99\n')
    with pytest.warns(UserWarning, match='latest'):
        ckpt = find_resumable(two_checkpoints)
    assert Path(ckpt['path']).name == 'epoch_2'


def test_latest_is_preferred_over_mtime(two_checkpoints):
    import os
    import time
    # make epoch_1 look newer on disk; the pointer still decides
    t = time.time() + 100
    os.utime(two_checkpoints / 'epoch_1', (t, t))
    ckpt = find_resumable(two_checkpoints)
    assert Path(ckpt['path']).name == 'epoch_2'


def test_fallback_is_used_by_runner_resume(two_checkpoints, tiny_parts):
    work = two_checkpoints.parent
    _flip_byte(two_checkpoints / 'epoch_2' / 'model.safetensors')
    runner = Runner(**_resume_parts(tiny_parts, work, resume=True,
                                    train_cfg=dict(by_epoch=True, max_epochs=2)))
    with pytest.warns(UserWarning, match='model.safetensors'):
        runner.train()
    runner.close()
    # resumed from epoch_1 and trained epoch 2 again
    assert runner.epoch == 2 and runner.iter == 16


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(two_checkpoints, tiny_parts):
    for d in ('epoch_1', 'epoch_2'):
        (two_checkpoints / d / 'manifest.json').unlink()
    with pytest.warns(UserWarning):
        with pytest.raises(CheckpointError, match='no valid checkpoint'):
            find_resumable(two_checkpoints)
    runner = Runner(**_resume_parts(tiny_parts, two_checkpoints.parent, resume=True))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError):
        runner.train()
    runner.close()
    assert runner.iter == 0


def test_resume_with_empty_work_dir_is_an_error(tmp_path, tiny_parts):
    runner = Runner(**_resume_parts(tiny_parts, tmp_path, resume=True))
    with pytest.raises(CheckpointError):
        runner.train()
    runner.close()
    assert runner.iter == 0


def test_resume_auto_starts_fresh_only_where_no_checkpoint_was_ever_written(
        tmp_path, two_checkpoints, tiny_parts):
    # A first submission (requeue scripts pass resume='auto' every time): trains from scratch.
    runner = Runner(**_resume_parts(tiny_parts, tmp_path, resume='auto'))
    runner.train()
    runner.close()
    assert runner.iter == 16 and (tmp_path / 'checkpoints' / 'epoch_2').is_dir()
    # Checkpoints exist but all are damaged: still an error, never a silent fresh start.
    for d in ('epoch_1', 'epoch_2'):
        (two_checkpoints / d / 'manifest.json').unlink()
    runner = Runner(**_resume_parts(tiny_parts, two_checkpoints.parent, resume='auto'))
    with pytest.warns(UserWarning), pytest.raises(CheckpointError):
        runner.train()
    runner.close()
    assert runner.iter == 0


# ---- load_from -------------------------------------------------------------------------------
class WiderRegressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)   # shape mismatch
        self.extra = nn.Linear(2, 2)    # missing from the checkpoint

    def forward(self, x, y=None):
        return {'loss': self.linear(x).sum()}


def test_load_from_mismatch_lists_everything_and_loads_nothing(two_checkpoints, tiny_parts, tmp_path):
    model = WiderRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = Runner(**tiny_parts(tmp_path / 'new', model=model,
                                 load_from=str(two_checkpoints / 'epoch_2')))
    with pytest.raises(CheckpointError) as err:
        runner.val()
    runner.close()
    msg = str(err.value)
    for key in ('linear.weight', 'linear.bias', 'extra.weight', 'extra.bias'):
        assert key in msg, (key, msg)
    assert '(2, 4)' in msg and '(1, 4)' in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f'{k} was partly loaded'


def test_load_from_unexpected_keys_are_listed(tmp_path, tiny_parts):
    weights = {k: v.clone() for k, v in PlainRegressor().state_dict().items()}
    weights['head.weight'] = torch.zeros(3)
    path = tmp_path / 'w.safetensors'
    save_file(weights, str(path))
    model = PlainRegressor()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runner = Runner(**tiny_parts(tmp_path / 'run', model=model, load_from=str(path)))
    with pytest.raises(CheckpointError, match='head.weight'):
        runner.val()
    runner.close()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_from_bare_safetensors(tmp_path, tiny_parts):
    src = PlainRegressor()
    with torch.no_grad():
        src.linear.weight.fill_(0.25)
        src.linear.bias.fill_(-1.5)
    path = tmp_path / 'weights.safetensors'
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = PlainRegressor()
    runner = Runner(**tiny_parts(tmp_path / 'run', model=model, load_from=str(path)))
    runner.val()
    runner.close()
    from scale_runner.model import unwrap
    sd = unwrap(runner.model).state_dict()
    assert torch.equal(sd['linear.weight'], src.linear.weight)
    assert torch.equal(sd['linear.bias'], src.linear.bias)


def test_load_from_checkpoint_dir_then_val(two_checkpoints, tiny_parts, tmp_path):
    expected = read_model_weights(two_checkpoints / 'epoch_2')
    runner = Runner(**tiny_parts(tmp_path / 'run', load_from=str(two_checkpoints / 'epoch_2')))
    runner.val()
    runner.close()
    from scale_runner.model import unwrap
    for k, v in unwrap(runner.model).state_dict().items():
        assert torch.equal(v, expected[k])


MARKER = Path('/tmp/scale_runner_pickle_marker')


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, (f'touch {MARKER}',))


def _pickle_bomb(path: Path) -> None:
    path.write_bytes(pickle.dumps({'weight': _Evil()}))


@pytest.fixture
def no_marker():
    MARKER.unlink(missing_ok=True)
    yield
    assert not MARKER.exists(), 'a pickle was executed'
    MARKER.unlink(missing_ok=True)


@pytest.mark.parametrize('name', ['model.pth', 'model.bin', 'model.pt', 'model.ckpt'])
def test_load_from_pickle_path_is_refused(tmp_path, tiny_parts, no_marker, name):
    path = tmp_path / name
    _pickle_bomb(path)
    runner = Runner(**tiny_parts(tmp_path / 'run', load_from=str(path)))
    with pytest.raises(CheckpointError, match='pickle'):
        runner.val()
    runner.close()


def test_torch_save_renamed_to_safetensors_is_refused(tmp_path, tiny_parts, no_marker):
    path = tmp_path / 'weights.safetensors'
    torch.save({'linear.weight': torch.zeros(1, 4), 'linear.bias': torch.zeros(1)}, str(path))
    with pytest.raises(CheckpointError, match='weights.safetensors'):
        read_model_weights(path)
    _pickle_bomb(path)
    with pytest.raises(CheckpointError, match='weights.safetensors'):
        read_model_weights(path)


# ---- planted pickles inside a checkpoint dir ------------------------------------------------------
@pytest.mark.parametrize('target', ['model.safetensors', 'state.safetensors', 'state.json',
                                    'rng_0.safetensors', 'manifest.json'])
def test_planted_pickle_is_never_unpickled(two_checkpoints, no_marker, target):
    ckpt = two_checkpoints / 'epoch_2'
    _pickle_bomb(ckpt / target)
    with pytest.raises(CheckpointError, match=target.replace('.', r'\.')):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError):
        read_model_weights(ckpt)
    with pytest.warns(UserWarning, match=target.replace('.', r'\.')):
        ckpt_ok = find_resumable(two_checkpoints)
    assert Path(ckpt_ok['path']).name == 'epoch_1'


def test_planted_pickle_with_forged_manifest_is_never_unpickled(two_checkpoints, no_marker):
    """An attacker controlling the folder can also fix the manifest: the loader still only
    parses safetensors/JSON, so the payload fails to parse and never runs."""
    ckpt = two_checkpoints / 'epoch_2'
    _pickle_bomb(ckpt / 'model.safetensors')
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    data = (ckpt / 'model.safetensors').read_bytes()
    # (a format-1 entry: one sha256 of the whole file)
    manifest['files']['model.safetensors'] = {'size': len(data),
                                              'sha256': hashlib.sha256(data).hexdigest()}
    (ckpt / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match='model.safetensors'):
        read_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match='model.safetensors'):
        read_model_weights(ckpt)


def test_extra_files_not_in_manifest_are_ignored(two_checkpoints, tiny_parts, no_marker):
    ckpt = two_checkpoints / 'epoch_2'
    for name in ('evil.pkl', 'optimizer.bin', 'pytorch_model.bin', 'extra.safetensors'):
        _pickle_bomb(ckpt / name)
    got = read_checkpoint(ckpt)
    assert Path(got['path']).name == 'epoch_2'
    weights = read_model_weights(ckpt)
    assert set(weights) == {'linear.weight', 'linear.bias'}
    runner = Runner(**_resume_parts(tiny_parts, two_checkpoints.parent, resume=True,
                                    train_cfg=dict(by_epoch=True, max_epochs=3)))
    runner.train()
    runner.close()
    assert runner.epoch == 3


def test_manifest_naming_outside_file_is_refused(two_checkpoints, no_marker):
    ckpt = two_checkpoints / 'epoch_2'
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    manifest['files']['../epoch_1/model.safetensors'] = manifest['files']['model.safetensors']
    (ckpt / 'manifest.json').write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match='invalid file name'):
        read_checkpoint(ckpt)


def test_resume_path_to_specific_checkpoint(two_checkpoints, tiny_parts):
    runner = Runner(**_resume_parts(tiny_parts, two_checkpoints.parent,
                                    resume=str(two_checkpoints / 'epoch_1'),
                                    train_cfg=dict(by_epoch=True, max_epochs=2)))
    runner.train()
    runner.close()
    assert runner.iter == 16
    shutil.rmtree(two_checkpoints / 'epoch_1')
    runner = Runner(**_resume_parts(tiny_parts, two_checkpoints.parent,
                                    resume=str(two_checkpoints / 'epoch_1')))
    with pytest.raises(CheckpointError, match='epoch_1'):
        runner.train()
    runner.close()


class DropoutRegressor(PlainRegressor):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x, y=None):
        return super().forward(self.drop(x), y)


def test_epoch_resume_with_dropout_and_validation_is_bit_identical(tmp_path, tiny_parts):
    def parts(work_dir, **over):
        torch.manual_seed(0)
        return _resume_parts(tiny_parts, work_dir, model=DropoutRegressor(), **over)
    full = _train(parts(tmp_path / 'full', train_cfg=dict(by_epoch=True, max_epochs=2)))
    work = tmp_path / 'split'
    _train(parts(work, train_cfg=dict(by_epoch=True, max_epochs=1)))
    resumed = _train(parts(work, resume=True, train_cfg=dict(by_epoch=True, max_epochs=2)))
    expected, got = _final_weights(full), _final_weights(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


# ---- CheckpointHook options ---------------------------------------------------------------------
def _val_scores(runner) -> list[float]:
    import json as _json
    recs = [_json.loads(line) for line in (runner.log_dir / 'scalars.jsonl').read_text().splitlines()]
    return [r['val/mse'] for r in recs if 'val/mse' in r]


def test_save_best_auto_keeps_only_the_best_and_publishes_it(tmp_path, tiny_parts):
    runner = _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=4),
                                  default_hooks=dict(checkpoint=dict(save_best='auto', max_keep_ckpts=-1))))
    scores = _val_scores(runner)
    assert len(scores) == 4
    best_epoch = min(range(4), key=scores.__getitem__) + 1
    root = tmp_path / 'checkpoints'
    best = sorted(p.name for p in root.glob('best_*'))
    assert best == [f'best_mse_epoch_{best_epoch}'], best  # 'mse' -> rule 'less', one kept
    assert runner.best_scores == {'mse': pytest.approx(min(scores))}
    state = read_checkpoint(root / best[0])['state']
    assert state['hooks.checkpoint']['best']['mse']['ckpts'] == best
    assert {f'epoch_{i}' for i in range(1, 5)} <= {p.name for p in root.iterdir()}


def test_save_best_state_survives_resume(tmp_path, tiny_parts):
    over = dict(default_hooks=dict(checkpoint=dict(save_best='mse', rule='greater', max_keep_best=2)))
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=2), **over))
    before = sorted(p.name for p in (tmp_path / 'checkpoints').glob('best_*'))
    runner = Runner(**_resume_parts(tiny_parts, tmp_path, resume=True,
                                    train_cfg=dict(by_epoch=True, max_epochs=4), **over))
    runner.train()
    runner.close()
    hook = runner.get_hook('CheckpointHook')
    scores = _val_scores(runner)  # epochs 3 and 4 only (a new log dir)
    assert len(scores) == 2
    # the 'greater' best over all 4 epochs; at most 2 best checkpoints kept, oldest dropped
    kept = hook.best['mse']['ckpts']
    assert len(kept) <= 2 and sorted(p.name for p in (tmp_path / 'checkpoints').glob('best_*')) == sorted(kept)
    assert runner.best_scores['mse'] >= max(scores)
    assert set(before) & set(kept) or kept[-1].endswith(('_3', '_4'))


@pytest.mark.parametrize('key, rule', [('accuracy', 'greater'), ('val/top1_acc', 'greater'),
                                       ('bbox_mAP', 'greater'), ('f1-score', 'greater'),
                                       ('loss', 'less'), ('val/perplexity', 'less'),
                                       ('error_rate', 'less'), ('mse', 'less')])
def test_rule_is_inferred_for_common_names(key, rule):
    from scale_runner.metric_rules import infer_rule
    assert infer_rule(key) == rule


def test_unknown_metric_needs_a_rule():
    from scale_runner import ConfigError
    from scale_runner.hooks.checkpoint_hook import CheckpointHook
    with pytest.raises(ConfigError, match="rule='greater'"):
        CheckpointHook(save_best='widgets')
    CheckpointHook(save_best='widgets', rule='less')
    with pytest.raises(ConfigError, match='one rule per'):
        CheckpointHook(save_best=['acc', 'loss'], rule=['greater'])
    with pytest.raises(ConfigError, match='greater'):
        CheckpointHook(save_best='acc', rule='bigger')


def test_save_best_missing_key_names_the_available_ones(tmp_path, tiny_parts):
    from scale_runner import ConfigError
    runner = Runner(**_resume_parts(tiny_parts, tmp_path, default_hooks=dict(
        checkpoint=dict(save_best='accuracy'))))
    with pytest.raises(ConfigError, match="'mse'"):
        runner.train()
    runner.close()


def test_checkpoint_hook_options(tmp_path, tiny_parts):
    out = tmp_path / 'elsewhere'
    runner = _train(_resume_parts(
        tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=2),
        default_hooks=dict(checkpoint=dict(by_epoch=False, interval=3, save_begin=5, max_keep_ckpts=2,
                                           out_dir=str(out), filename_tmpl='step{}',
                                           save_optimizer=False, save_param_scheduler=False))))
    assert runner.iter == 16
    # the interval counts from save_begin (MMEngine's): saves at 5, 8, 11, 14 and the last
    # (16); only the newest 2 are kept
    assert sorted(p.name for p in out.iterdir()) == ['latest', 'step14', 'step16']
    state = read_checkpoint(out / 'step16')['state']
    assert 'optimizer' not in state and 'param_schedulers' not in state
    assert not (tmp_path / 'checkpoints').exists()


def test_save_last_false_and_interval(tmp_path, tiny_parts):
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=3),
                         default_hooks=dict(checkpoint=dict(interval=2, save_last=False))))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['epoch_2', 'latest']


# ---- export -----------------------------------------------------------------------------------
def test_export_writes_weights_only_with_metadata(two_checkpoints, tmp_path, capsys):
    from safetensors import safe_open
    from scale_runner.cli import main
    out = tmp_path / 'out' / 'model.safetensors'
    assert main(['export', str(two_checkpoints / 'epoch_2'), str(out)]) == 0
    with safe_open(str(out), framework='pt') as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert keys == {'linear.weight', 'linear.bias'}
    assert meta['format'] == 'pt' and meta['producer'].startswith('scale_runner')
    assert meta['epoch'] == '2' and meta['iter'] == '16' and meta['source'] == 'epoch_2'
    expected = read_model_weights(two_checkpoints / 'epoch_2')
    got = read_model_weights(out)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert [p.name for p in out.parent.iterdir()] == ['model.safetensors']  # no temp file left


def test_export_refuses_damaged_checkpoint_and_non_safetensors_target(two_checkpoints, tmp_path, capsys):
    from scale_runner.cli import main
    _flip_byte(two_checkpoints / 'epoch_2' / 'model.safetensors')
    assert main(['export', str(two_checkpoints / 'epoch_2'), str(tmp_path / 'w.safetensors')]) == 1
    assert 'model.safetensors' in capsys.readouterr().err
    assert not (tmp_path / 'w.safetensors').exists()
    assert main(['export', str(two_checkpoints / 'epoch_1'), str(tmp_path / 'w.pth')]) == 1
    assert '.safetensors' in capsys.readouterr().err


# ---- fields that differ from the checkpoint's run ----------------------------------------------------
def test_different_batch_size_continues_from_the_same_global_sample(two_checkpoints, tiny_parts):
    """A per-process batch size change is handled by the global-position rule: the log names
    the change and says the continuation is not bit-identical; the counters continue."""
    parts = _resume_parts(tiny_parts, two_checkpoints.parent, resume=True,
                          train_cfg=dict(by_epoch=True, max_epochs=3))
    parts['train_dataloader'] = dict(parts['train_dataloader'], batch_size=4)
    with Runner(**parts) as runner:
        runner.train()
        log = (runner.log_dir / f'{runner.experiment_name}.log').read_text()
    assert 'global batch 8 -> 4 samples per iteration' in log and 'not bit-identical' in log, log
    assert runner.epoch == 3 and runner.iter == 16 + len(runner.train_dataloader)


def test_different_accumulation_is_refused_naming_the_field(two_checkpoints, tiny_parts):
    runner = Runner(**_resume_parts(
        tiny_parts, two_checkpoints.parent, resume=True, train_cfg=dict(by_epoch=True, max_epochs=3),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9), accumulative_counts=2)))
    with pytest.raises(CheckpointError, match='accumulative_counts'):
        runner.train()
    runner.close()


# ---- every file the loader reads ---------------------------------------------------------------
@pytest.fixture
def window_checkpoints(tmp_path, tiny_parts):
    """Checkpoints inside an accumulation window: they hold grad_0.safetensors too."""
    _train(_resume_parts(tiny_parts, tmp_path, train_cfg=dict(by_epoch=True, max_epochs=3),
                         optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05), accumulative_counts=3)))
    root = tmp_path / 'checkpoints'
    assert (root / 'epoch_2' / 'grad_0.safetensors').is_file()  # iteration 16 is mid-window
    shutil.rmtree(root / 'epoch_3')  # the last iteration closes its window: no gradients there
    (root / 'latest').write_text('epoch_2\n')
    return root


@pytest.mark.parametrize('target', ['model.safetensors', 'state.safetensors', 'state.json',
                                    'rng_0.safetensors', 'rng_0.json', 'grad_0.safetensors',
                                    'manifest.json'])
def test_every_file_the_loader_reads_refuses_a_pickle(window_checkpoints, no_marker, target):
    ckpt = window_checkpoints / 'epoch_2'
    _pickle_bomb(ckpt / target)
    pattern = target.replace('.', r'\.')
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(ckpt)
    # even with a manifest forged to match, the payload is parsed as safetensors/JSON only
    if target != 'manifest.json':
        manifest = json.loads((ckpt / 'manifest.json').read_text())
        data = (ckpt / target).read_bytes()
        manifest['files'][target] = {'size': len(data), 'chunk_size': 1 << 20, 'crc32': [zlib.crc32(data)]}
        (ckpt / 'manifest.json').write_text(json.dumps(manifest))
        with pytest.raises(CheckpointError, match=pattern):
            read_checkpoint(ckpt)
    with pytest.warns(UserWarning, match=pattern):
        assert Path(find_resumable(window_checkpoints)['path']).name == 'epoch_1'


def test_pickled_latest_pointer_is_never_unpickled(two_checkpoints, no_marker):
    _pickle_bomb(two_checkpoints / 'latest')
    with pytest.warns(UserWarning, match='latest'):
        assert Path(find_resumable(two_checkpoints)['path']).name == 'epoch_2'


def test_truncated_model_falls_back(two_checkpoints):
    p = two_checkpoints / 'epoch_2' / 'model.safetensors'
    p.write_bytes(p.read_bytes()[:20])
    with pytest.warns(UserWarning, match='model.safetensors'):
        assert Path(find_resumable(two_checkpoints)['path']).name == 'epoch_1'


def test_mid_window_resume_restores_partial_gradients_in_process(tmp_path, tiny_parts):
    over = dict(optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01), accumulative_counts=3))
    full = _train(_resume_parts(tiny_parts, tmp_path / 'full', train_cfg=dict(by_epoch=True, max_epochs=3), **over))
    work = tmp_path / 'split'

    class Crash(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if runner.iter == 10:
                raise RuntimeError('crash')

    with pytest.raises(RuntimeError, match='crash'):
        _train(_resume_parts(tiny_parts, work, train_cfg=dict(by_epoch=True, max_epochs=3),
                             custom_hooks=[Crash()], **over))
    assert (work / 'checkpoints' / 'epoch_1' / 'grad_0.safetensors').is_file()  # 8 % 3 != 0
    resumed = _train(_resume_parts(tiny_parts, work, resume=True,
                                   train_cfg=dict(by_epoch=True, max_epochs=3), **over))
    expected, got = _final_weights(full), _final_weights(resumed)
    for k in expected:
        assert torch.equal(expected[k], got[k]), k


@pytest.mark.parametrize('interval,save_begin,save_last', [
    (0, 0, True), (1, 0, True), (3, 0, True), (3, 5, True), (2, 3, False), (4, 0, False), (0, 0, False)])
def test_next_due_iteration_is_the_first_due_one(interval, save_begin, save_last):
    """The per-iteration fast path skips every iteration before ``_next_due``: no iteration
    that ``_due`` would save may lie before it, and it must be one ``_due`` saves (or lie
    past the last iteration)."""
    from scale_runner.hooks.checkpoint_hook import CheckpointHook
    hook = CheckpointHook(interval=interval, save_begin=save_begin, save_last=save_last)
    hook.by_epoch, last = False, 17
    for progress in range(last + 1):
        nxt = hook._next_due(progress, last)
        due = [i for i in range(progress + 1, last + 1) if hook._due(i, last)]
        assert min(nxt, last + 1) == (due[0] if due else last + 1), (progress, nxt, due)
    hook.by_epoch = True  # an epoch loop saves in after_train_epoch, never per iteration
    assert hook._next_due(0, last) == float('inf')
