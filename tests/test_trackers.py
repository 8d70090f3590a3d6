"""Trackers through Accelerate (wandb offline, TensorBoard), read back with their own readers."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import RegressionData

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'spiral_mlp.py')


def read_wandb(run_file: Path):
    """History rows ``{step: {key: value}}``, config and run id of an offline ``.wandb`` file.

    The file is wandb's LevelDB-style record log (32 KiB blocks of CRC'd chunks) of
    ``wandb_internal_pb2.Record`` protobufs, decoded with wandb's own message classes.
    """
    from wandb.proto import wandb_internal_pb2 as pb
    data = run_file.read_bytes()
    ident, magic, _version = struct.unpack('<4sHB', data[:7])
    assert ident == b':W&B' and magic == 0xBEE1, 'not a wandb run file'
    pos, buf = 7, b''
    history, config, run_id = {}, {}, None
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):  # FULL or LAST chunk ends a record
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b''
        which = rec.WhichOneof('record_type')
        if which == 'history':
            row = {(i.key or '/'.join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history.setdefault(row['_step'], {}).update(
                {k: v for k, v in row.items() if not k.startswith('_')})
        elif which == 'config':
            config.update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif which == 'run':
            run_id = rec.run.run_id
    return history, config, run_id


def read_tensorboard(run_dir: Path) -> dict:
    """``{step: {tag: value}}`` of the scalar events in ``run_dir`` (tensorboard's reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={'scalars': 0})
    acc.Reload()
    out: dict = {}
    for tag in acc.Tags()['scalars']:
        for event in acc.Scalars(tag):
            out.setdefault(event.step, {})[tag] = event.value
    return out


def jsonl_by_step(files) -> dict:
    out: dict = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            r = json.loads(line)
            out.setdefault(r['step'], {}).update(
                {k: v for k, v in r.items() if k not in ('step', 'epoch', 'iter')})
    return out


def _assert_same(expected: dict, got: dict, rel=1e-6):
    assert sorted(got) == sorted(expected)
    for step, values in expected.items():
        assert set(got[step]) == set(values), (step, got[step], values)
        for k, v in values.items():
            assert got[step][k] == pytest.approx(v, rel=rel, abs=1e-7), (step, k)


def test_wandb_and_tensorboard_match_scalars_file_across_resume(tmp_path, tiny_parts):
    from scale_runner import Runner
    trackers = [dict(type='wandb', project='scale-runner-tests', init_kwargs=dict(tags=['t'])),
                dict(type='tensorboard')]
    common = dict(trackers=trackers, default_hooks=dict(logger=dict(interval=3)),
                  test_dataloader=dict(dataset=RegressionData(12, seed=2), batch_size=8),
                  test_cfg=dict(), test_evaluator=dict(type='MSE'))
    cfg = dict(model=dict(type='SomeModel'), train_cfg=dict(max_epochs=1), lr=0.05)
    first = Runner(**tiny_parts(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=1),
                                experiment_name='first', cfg=cfg, **common))
    first.train()
    second = Runner(**tiny_parts(tmp_path, experiment_name='second', resume=True, **common))
    second.train()   # epoch 2, from the epoch_1 checkpoint
    second.test()    # test metrics at the last train step, under test/
    second.close()
    first.close()

    j1 = jsonl_by_step([tmp_path / 'first' / 'scalars.jsonl'])
    j2 = jsonl_by_step([tmp_path / 'second' / 'scalars.jsonl'])
    assert sorted(j1) == [3, 6, 8] and sorted(j2) == [11, 14, 16]  # continued, no overlap
    assert 'val/mse' in j1[8] and 'loss' in j1[6] and 'val/mse' in j2[16] and 'test/mse' in j2[16]

    # wandb: one run id across the resume; each offline run holds exactly the file's steps
    runs = sorted((tmp_path / 'wandb').glob('offline-run-*/run-*.wandb'), key=lambda p: p.stat().st_mtime)
    assert len(runs) == 3  # first train, resumed train, test
    (h1, c1, id1), (h2, _, id2), (h3, _, id3) = (read_wandb(r) for r in runs)
    assert id1 == id2 == id3
    _assert_same(j1, h1)
    _assert_same({s: {k: v for k, v in d.items() if not k.startswith('test/')} for s, d in j2.items()}, h2)
    _assert_same({16: {k: v for k, v in j2[16].items() if k.startswith('test/')}}, h3)
    assert c1['lr'] == 0.05 and c1['train_cfg.max_epochs'] == 1 and c1['model.type'] == 'SomeModel'

    # TensorBoard: the resumed run writes into the same run directory, steps continue
    tb_runs = [p for p in (tmp_path / 'tensorboard').iterdir() if p.is_dir()]
    assert [p.name for p in tb_runs] == ['first']
    _assert_same({**j1, **{s: {**j1.get(s, {}), **d} for s, d in j2.items()}},
                 read_tensorboard(tb_runs[0]))
    hparams = list(tb_runs[0].glob('*/hparams.yml'))
    assert hparams and 'train_cfg.max_epochs: 1' in hparams[0].read_text()


def test_unknown_tracker_type_names_the_closest(tmp_path, tiny_parts):
    from scale_runner import ConfigError, Runner
    runner = Runner(**tiny_parts(tmp_path, trackers=[dict(type='tensorbord')]))
    with pytest.raises(ConfigError, match=r"trackers\[0\]\.type='tensorbord'.*'tensorboard'"):
        runner.train()
    runner = Runner(**tiny_parts(tmp_path, trackers=[dict(type='wandb', projekt='x')]))
    with pytest.raises(ConfigError, match=r'trackers\[0\]\.projekt.*project'):
        runner.train()


def test_missing_tracker_package_fails_at_start_with_pip_line(tmp_path):
    config = tmp_path / 'with_wandb.py'
    config.write_text(f"_base_ = [{CONFIG!r}]\ntrackers = [dict(type='wandb', project='x')]\n")
    code = textwrap.dedent(f'''
        import sys
        sys.modules['wandb'] = None  # as if wandb were not installed
        from scale_runner.cli import main
        sys.exit(main(['train', {str(config)!r}, '--work-dir', {str(tmp_path / 'w')!r},
                       '--cfg-options', 'train_cfg.max_epochs=1', 'train_dataloader.dataset.size=64']))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert 'pip install wandb' in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert "trackers[0].type='wandb'" in proc.stderr
    assert 'Epoch(train)' not in proc.stdout and not (tmp_path / 'w' / 'checkpoints').exists()
