"""The checkpoint state protocol (``scale_runner/checkpoint/state.py``), end to end through the
Runner: named parts in ``state.json``, a user hook saved and restored from its ``state_dict`` /
``load_state_dict`` alone, repeated hook classes kept apart, default hooks under their
``default_hooks`` names, MMEngine's ``before_save_checkpoint`` / ``after_load_checkpoint``
keys, a hook the checkpoint has no state for, and format-3 checkpoints (resume refused,
``load_from`` still loads the weights). Single process, real training runs, no mocks."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import xxhash

from conftest import PlainRegressor
from proto_hooks import StatefulProbe  # importing it registers StatefulProbe and ExtraKeyHook
from scale_runner import Runner
from scale_runner.checkpoint import CheckpointError, read_checkpoint, read_model_weights
from scale_runner.model import unwrap


def _parts(tiny_parts, work_dir, epochs, **over):
    """Shuffled data, SGD with momentum, a step schedule; the same initial weights every time."""
    torch.manual_seed(0)
    parts = tiny_parts(work_dir, model=PlainRegressor(),
                       optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
                       param_scheduler=dict(type='StepLR', step_size=3, gamma=0.5, by_epoch=False),
                       train_cfg=dict(by_epoch=True, max_epochs=epochs))
    parts.update(over)
    return parts


def _train(parts) -> Runner:
    with Runner(**parts) as runner:
        runner.train()
    return runner


def _log(runner) -> str:
    return (runner.log_dir / f'{runner.experiment_name}.log').read_text()


def _state_json(ckpt: Path) -> dict:
    return json.loads((ckpt / 'state.json').read_text())


def _probes(runner) -> dict[str, StatefulProbe]:
    return {name: h for name, h in runner.named_hooks() if isinstance(h, StatefulProbe)}


def assert_identical(got, expected, where='state'):
    """Bit for bit: the same types (an int key stays an int, a bool a bool), equal values, and
    tensors of the same dtype, shape and bytes."""
    assert type(got) is type(expected), f'{where}: {type(got).__name__} != {type(expected).__name__}'
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert torch.equal(got.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)), where
    elif isinstance(expected, dict):
        assert list(got) == list(expected), f'{where}: keys {list(got)} != {list(expected)}'
        for k in expected:
            assert_identical(got[k], expected[k], f'{where}.{k}')
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_identical(a, b, f'{where}[{i}]')
    else:
        assert got == expected, f'{where}: {got!r} != {expected!r}'


# ---- 1. a user hook's state ------------------------------------------------------------------
def test_user_hook_state_is_saved_under_its_class_name_and_restored_bit_for_bit(tmp_path, tiny_parts):
    probe = [dict(type='StatefulProbe')]
    full = _train(_parts(tiny_parts, tmp_path / 'full', 2, custom_hooks=probe))
    expected_end = _probes(full)['StatefulProbe'].state_dict()

    work = tmp_path / 'split'
    first = _train(_parts(tiny_parts, work, 1, custom_hooks=probe))
    saved = _probes(first)['StatefulProbe'].state_dict()
    assert saved['seen'] == 8 and saved['per_epoch'] == {0: 8}
    ckpt = work / 'checkpoints' / 'epoch_1'
    doc = _state_json(ckpt)
    assert 'hooks.StatefulProbe' in doc, sorted(doc)
    assert doc['hooks.StatefulProbe']['acc'] == {'__tensor__': 'hooks.StatefulProbe.acc'}
    assert_identical(read_checkpoint(ckpt)['state']['hooks.StatefulProbe'], saved)

    resumed = _train(_parts(tiny_parts, work, 2, custom_hooks=probe, resume=True))
    hook = _probes(resumed)['StatefulProbe']
    assert hook.loaded is not None, 'load_state_dict was not called on resume'
    assert_identical(hook.loaded, saved, 'loaded')
    # ... and the hook continues exactly as in the run that was never interrupted
    assert_identical(hook.state_dict(), expected_end, 'after resume')


# ---- 2. repeated hook classes ------------------------------------------------------------------
def test_two_instances_of_one_hook_class_keep_separate_states_across_resume(tmp_path, tiny_parts):
    # The second one runs first (higher priority): names follow custom_hooks' order, not priority.
    hooks = [dict(type='StatefulProbe', tag='a', step=1),
             dict(type='StatefulProbe', tag='b', step=10, priority='HIGH')]
    first = _train(_parts(tiny_parts, tmp_path, 1, custom_hooks=hooks))
    probes = _probes(first)
    assert set(probes) == {'StatefulProbe', 'StatefulProbe_2'}
    saved = {name: h.state_dict() for name, h in probes.items()}
    assert (saved['StatefulProbe']['tag'], saved['StatefulProbe_2']['tag']) == ('a', 'b')
    doc = _state_json(tmp_path / 'checkpoints' / 'epoch_1')
    assert doc['hooks.StatefulProbe']['tag'] == 'a' and doc['hooks.StatefulProbe']['seen'] == 8
    assert doc['hooks.StatefulProbe_2']['tag'] == 'b' and doc['hooks.StatefulProbe_2']['seen'] == 80
    state = read_checkpoint(tmp_path / 'checkpoints' / 'epoch_1')['state']
    assert not torch.equal(state['hooks.StatefulProbe']['acc'], state['hooks.StatefulProbe_2']['acc'])

    resumed = _train(_parts(tiny_parts, tmp_path, 2, custom_hooks=hooks, resume=True))
    probes = _probes(resumed)
    for name in ('StatefulProbe', 'StatefulProbe_2'):
        assert_identical(probes[name].loaded, saved[name], f'{name} loaded')
    assert probes['StatefulProbe'].tag == 'a' and probes['StatefulProbe'].seen == 16
    assert probes['StatefulProbe_2'].tag == 'b' and probes['StatefulProbe_2'].seen == 160


# ---- 3. default hooks' names; MMEngine's checkpoint keys ---------------------------------------
def test_default_hooks_are_saved_under_their_names_and_extra_checkpoint_keys_come_back(tmp_path,
                                                                                      tiny_parts):
    over = dict(custom_hooks=[dict(type='ExtraKeyHook')],
                default_hooks=dict(checkpoint=dict(max_keep_ckpts=1)))
    first = _train(_parts(tiny_parts, tmp_path, 1, **over))
    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    doc = _state_json(ckpt)
    hook_keys = {k for k in doc if k.startswith('hooks.')}
    assert {'hooks.checkpoint', 'hooks.logger', 'hooks.nan_guard'} <= hook_keys, sorted(doc)
    class_named = {f'hooks.{type(h).__name__}' for h in first.hooks}
    assert not hook_keys & class_named, f'default hooks saved under class names: {hook_keys & class_named}'
    assert doc['hooks.checkpoint']['saved'] == ['epoch_1']
    assert 'hooks.ExtraKeyHook' not in doc  # no state_dict: not a stateful part
    added = first.get_hook('ExtraKeyHook').added
    assert added['iter'] == 8
    assert_identical(read_checkpoint(ckpt)['state']['my_extra'], added, 'my_extra as saved')

    resumed = _train(_parts(tiny_parts, tmp_path, 2, resume=True, **over))
    assert_identical(resumed.get_hook('ExtraKeyHook').got, added, 'my_extra on resume')
    # hooks.checkpoint was restored into CheckpointHook: it knows epoch_1 is its own, and
    # max_keep_ckpts=1 removes it once epoch_2 is written
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['epoch_2', 'latest']


# ---- 4. a hook the checkpoint has no state for ------------------------------------------------
@pytest.mark.parametrize('before, after, fresh', [
    ([], [dict(type='StatefulProbe')], 'StatefulProbe'),
    ([dict(type='StatefulProbe')], [dict(type='StatefulProbe'), dict(type='StatefulProbe', step=3)],
     'StatefulProbe_2'),
])
def test_hook_missing_from_the_checkpoint_is_named_in_a_warning_and_training_goes_on(
        tmp_path, tiny_parts, before, after, fresh):
    _train(_parts(tiny_parts, tmp_path, 1, custom_hooks=before))
    resumed = _train(_parts(tiny_parts, tmp_path, 2, custom_hooks=after, resume=True))
    log = _log(resumed)
    assert f'holds no state for hooks.{fresh} (StatefulProbe): it starts fresh' in log, log
    assert log.count('holds no state for') == 1, log  # only the new one
    assert resumed.epoch == 2 and resumed.iter == 16
    probes = _probes(resumed)
    assert probes[fresh].loaded is None and probes[fresh].seen == 8 * probes[fresh].step
    for name, hook in probes.items():
        if name != fresh:
            assert hook.loaded is not None and hook.seen == 16


# ---- 5. format 3 ------------------------------------------------------------------------------
def _entry(data: bytes, chunk: int) -> dict:
    return {'size': len(data), 'chunk_size': chunk,
            'xxh3_64': [xxhash.xxh3_64_hexdigest(data[a:a + chunk])
                        for a in range(0, max(len(data), 1), chunk)]}


def _make_format_3(ckpt: Path, layout: str) -> None:
    """Turn a checkpoint into one of format 3: ``version`` only changes the number; ``v3``
    also lays state.json out as format 3 wrote it (scale_runner before the state protocol:
    ``hooks`` by class name, ``optimizer``, ``optim_wrapper`` counters, a list of
    ``param_schedulers``; the tensors keep their keys, which were the same); the manifest's
    entry for state.json is rewritten to match."""
    doc = _state_json(ckpt)
    if layout == 'v3':
        optim = doc['optim_wrapper']
        names = {'checkpoint': 'CheckpointHook', 'logger': 'LoggerHook', 'nan_guard': 'NanGuardHook'}
        hooks = {names.get(k[6:], k[6:]): v for k, v in doc.items() if k.startswith('hooks.')}
        if 'NanGuardHook' in hooks:
            hooks['NanGuardHook'] = {'skipped': hooks['NanGuardHook']['nan_skips'],
                                     'consecutive': hooks['NanGuardHook']['consecutive']}
        doc = {'meta': doc['meta'], 'train_state': doc['train_state'], 'hooks': hooks,
               'optimizer': {k: v for k, v in optim.items() if k != 'update_count'},
               'optim_wrapper': {'update_count': optim['update_count'], 'skipped_steps': None},
               'param_schedulers': [doc['param_schedulers.0']]}
    doc['format_version'] = 3
    data = json.dumps(doc, indent=1).encode()
    (ckpt / 'state.json').write_bytes(data)
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    chunk = manifest['files']['state.json']['chunk_size']
    manifest['files']['state.json'] = _entry(data, chunk)
    manifest['format_version'] = 3
    (ckpt / 'manifest.json').write_text(json.dumps(manifest, indent=1))


@pytest.mark.parametrize('layout', ['version', 'v3'])
def test_format_3_checkpoint_is_refused_for_resume_naming_load_from_and_load_from_loads_it(
        tmp_path, tiny_parts, layout):
    _train(_parts(tiny_parts, tmp_path, 1))
    root = tmp_path / 'checkpoints'
    ckpt = root / 'epoch_1'
    _make_format_3(ckpt, layout)
    read_checkpoint(ckpt)  # a valid checkpoint (manifest and checksums agree): only too old
    weights = read_model_weights(ckpt)
    before = sorted(p.name for p in root.iterdir())

    for resume in (True, str(ckpt)):
        with Runner(**_parts(tiny_parts, tmp_path, 2, resume=resume)) as runner:
            with pytest.raises(CheckpointError) as err:
                runner.train()
        message = str(err.value)
        assert 'format 3' in message and f'load_from={str(ckpt)!r}' in message, message
        assert runner.iter == 0  # refused before any training
    assert sorted(p.name for p in root.iterdir()) == before  # nothing was written

    # load_from reads its weights (a new run starts from them)
    with Runner(**_parts(tiny_parts, tmp_path / 'new', 1, load_from=str(ckpt))) as runner:
        runner.val()
        live = unwrap(runner.model).state_dict()
    assert set(live) == set(weights)
    assert all(torch.equal(live[k], weights[k]) for k in weights)
    # and a new run trained from them starts at iteration 0
    new = _train(_parts(tiny_parts, tmp_path / 'new2', 1, load_from=str(ckpt)))
    assert new.iter == 8 and new.loaded_checkpoint_state is not None


def test_load_from_a_format_3_checkpoint_holds_on_to_no_optimizer_state(tmp_path, tiny_parts):
    """load_from keeps a checkpoint's hook states and counters for hooks that use them, "not
    the optimizer's or the schedulers': load_from starts a new run, and nothing should hold on
    to them" (Runner.load_checkpoint). Format 3 kept the optimizer under ``optimizer``."""
    _train(_parts(tiny_parts, tmp_path, 1))
    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    _make_format_3(ckpt, 'v3')
    with Runner(**_parts(tiny_parts, tmp_path / 'new', 1, load_from=str(ckpt))) as runner:
        runner.val()
    kept = runner.loaded_checkpoint_state
    assert any(k.startswith('hooks.') for k in kept) and 'train_state' in kept
    held = sorted(k for k in kept if k in ('optimizer', 'optim_wrapper', 'param_schedulers'))
    assert not held, f'load_from of a format-3 checkpoint holds on to {held}'


def test_format_3_ema_average_is_still_used_by_load_from_and_export_ema(tmp_path, tiny_parts):
    """Format 3 saved EMAHook's average under ``hooks.EMAHook`` too (``hooks`` -> ``EMAHook``
    in state.json), and ``val()`` with ``load_from`` evaluated it, as format 4 does. The
    refusal to resume points at load_from: the average must not be dropped there silently."""
    from scale_runner.checkpoint import export_weights
    ema = [dict(type='EMAHook', momentum=0.5)]
    _train(_parts(tiny_parts, tmp_path, 1, custom_hooks=ema))
    v4 = tmp_path / 'checkpoints' / 'epoch_1'
    v3 = tmp_path / 'old' / 'epoch_1'
    shutil.copytree(v4, v3)
    _make_format_3(v3, 'v3')
    assert 'EMAHook' in _state_json(v3)['hooks']

    def val(ckpt, hooks):
        with Runner(**_parts(tiny_parts, tmp_path / 'val', 1, load_from=str(ckpt),
                             custom_hooks=hooks)) as runner:
            return runner.val()
    raw, avg = val(v4, []), val(v4, ema)
    assert raw != avg  # the average is not the weights: the check below can tell them apart
    problems = []
    old = val(v3, ema)
    if old != avg:
        problems.append(f'val() with load_from of the format-3 checkpoint evaluated '
                        f'{"the training weights" if old == raw else "neither"} ({old}), not its '
                        f'EMA average ({avg})')
    export_weights(v4, tmp_path / 'v4.safetensors', ema=True)
    try:
        export_weights(v3, tmp_path / 'v3.safetensors', ema=True)
        a, b = (read_model_weights(tmp_path / f'{v}.safetensors') for v in ('v4', 'v3'))
        if not all(torch.equal(a[k], b[k]) for k in a):
            problems.append('export --ema of the format-3 checkpoint differs')
    except CheckpointError as e:
        problems.append(f'export --ema of the format-3 checkpoint: {e}')
    assert not problems, '; '.join(problems)


# ---- the stored types -------------------------------------------------------------------------
def test_hook_state_with_bool_keys_is_refused_at_save_or_restored(tmp_path, tiny_parts):
    """A dict key True is an int to isinstance: it is stored as ``__int__True``, which no read
    can turn back (``int('True')``). Either the save refuses it, naming it, as it does a float
    key, or the resume gives it back; a checkpoint that saves and then cannot be read (with a
    ValueError, so resume does not even fall back to an older one) is neither."""
    extra = {'by_flag': {True: 3, False: 4}}
    try:
        _train(_parts(tiny_parts, tmp_path, 1, custom_hooks=[StatefulProbe(extra=extra)]))
    except CheckpointError as e:
        assert 'True' in str(e) and 'by_flag' in str(e), e
        return
    ckpt = tmp_path / 'checkpoints' / 'epoch_1'
    try:
        state = read_checkpoint(ckpt)['state']
    except (ValueError, TypeError) as e:
        pytest.fail(f'the checkpoint was saved but cannot be read: {type(e).__name__}: {e}')
    assert_identical(state['hooks.StatefulProbe']['extra'], extra, 'extra')
