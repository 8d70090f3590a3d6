"""The ``scale-runner`` CLI end to end, in subprocesses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import pythonpath, run_cli

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'spiral_mlp.py')
BIN = Path(sys.executable).parent
SMALL = ['train_dataloader.dataset.size=512', 'val_dataloader.dataset.size=256',
         'test_dataloader.dataset.size=256', 'default_hooks.logger.interval=2']


def _ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'
    return proc


def _run_dirs(work_dir: Path) -> list[Path]:
    return sorted(p for p in work_dir.iterdir() if p.is_dir() and p.name != 'checkpoints')


def _scalars(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / 'scalars.jsonl').read_text().splitlines()]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """One 2-epoch training run through the CLI, shared by the tests that only read it."""
    work = tmp_path_factory.mktemp('cli') / 'work'
    proc = run_cli(['train', CONFIG, '--work-dir', str(work), '--cfg-options',
                    'train_cfg.max_epochs=2', 'experiment_name=first', *SMALL])
    return work, proc


# ---- help ------------------------------------------------------------------------------------
def test_help_does_not_import_torch():
    code = textwrap.dedent('''
        import sys
        from scale_runner import cli
        for argv in (['--help'], ['train', '--help'], ['val', '--help']):
            try:
                cli.main(argv)
            except SystemExit as e:
                assert e.code == 0, e.code
        print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH')
        print('ACCELERATE_IMPORTED' if 'accelerate' in sys.modules else 'NO_ACCELERATE')
    ''')
    proc = _ok(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              timeout=60))
    assert 'NO_TORCH' in proc.stdout and 'NO_ACCELERATE' in proc.stdout, proc.stdout


def test_python_m_help_does_not_import_torch():
    proc = _ok(subprocess.run([sys.executable, '-X', 'importtime', '-m', 'scale_runner', '--help'],
                              capture_output=True, text=True, timeout=60))
    assert 'train' in proc.stdout and 'config' in proc.stdout and 'hooks' in proc.stdout
    imported = {line.split('|')[-1].strip() for line in proc.stderr.splitlines() if '|' in line}
    assert 'torch' not in imported and 'accelerate' not in imported


def test_console_script_help():
    exe = BIN / 'scale-runner'
    assert exe.is_file(), 'the scale-runner console script is not installed next to python'
    proc = _ok(subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=60))
    for cmd in ('train', 'val', 'test', 'config', 'hooks'):
        assert cmd in proc.stdout


# ---- train / resume / val / test -------------------------------------------------------------
def test_train_writes_checkpoints_logs_and_config(trained):
    from scale_runner import Config
    work, proc = trained
    _ok(proc)
    assert 'accuracy' in proc.stdout
    ckpt = work / 'checkpoints' / 'epoch_2'
    assert (ckpt / 'manifest.json').is_file()
    assert (work / 'checkpoints' / 'latest').read_text().strip() == 'epoch_2'
    [run] = _run_dirs(work)
    assert (run / 'first.log').is_file() and (run / 'first.log').stat().st_size > 0
    records = _scalars(run)
    train_steps = [r['step'] for r in records if 'loss' in r]
    assert train_steps == list(range(2, 17, 2))
    assert any('val/accuracy' in r for r in records)
    cfg = Config.fromfile(str(run / 'config.py'))
    assert cfg.train_cfg.max_epochs == 2
    assert cfg.train_dataloader.dataset.size == 512
    assert cfg.work_dir == str(work)


def test_resume_continues_from_latest_checkpoint(trained, tmp_path):
    work, proc = trained
    _ok(proc)
    work2 = tmp_path / 'work'
    shutil.copytree(work, work2)
    proc = _ok(run_cli(['train', CONFIG, '--work-dir', str(work2), '--resume', '--cfg-options',
                        'train_cfg.max_epochs=3', 'experiment_name=second', *SMALL]))
    run = work2 / 'second'
    log = (run / 'second.log').read_text()
    assert 'resumed from' in log and 'epoch_2' in log
    first = [r['step'] for r in _scalars(work2 / 'first') if 'loss' in r]
    second = [r['step'] for r in _scalars(run) if 'loss' in r]
    assert second == list(range(18, 25, 2)), second  # epoch 3 only: no overlap, no gap
    assert max(first) < min(second)
    assert 'Epoch(train) [3]' in log and 'Epoch(train) [1]' not in log
    assert (work2 / 'checkpoints' / 'latest').read_text().strip() == 'epoch_3'


def test_resume_without_checkpoint_fails_cleanly(tmp_path):
    proc = run_cli(['train', CONFIG, '--work-dir', str(tmp_path / 'empty'), '--resume',
                    '--cfg-options', 'train_cfg.max_epochs=1', *SMALL])
    assert proc.returncode not in (0, 2), proc.returncode
    assert 'no valid checkpoint' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'empty' / 'checkpoints' / 'epoch_1').exists()


@pytest.mark.parametrize('command', ['val', 'test'])
def test_val_and_test_print_metrics(trained, tmp_path, command):
    work, proc = trained
    _ok(proc)
    proc = _ok(run_cli([command, CONFIG, '--work-dir', str(tmp_path / command), '--checkpoint',
                        str(work / 'checkpoints' / 'epoch_2'), '--cfg-options', *SMALL]))
    lines = [line for line in proc.stdout.splitlines() if line.startswith('accuracy')]
    assert lines, proc.stdout
    acc = float(lines[-1].split()[-1])
    assert 0.0 <= acc <= 1.0
    assert 'loaded weights from' in proc.stdout
    if command == 'val':
        # the same weights on the same data give the accuracy training logged
        records = _scalars(work / 'first')
        last_val = [r for r in records if 'val/accuracy' in r][-1]['val/accuracy']
        assert acc == pytest.approx(last_val)


def test_val_with_damaged_checkpoint_fails_cleanly(trained, tmp_path):
    work, proc = trained
    _ok(proc)
    ckpt = tmp_path / 'epoch_2'
    shutil.copytree(work / 'checkpoints' / 'epoch_2', ckpt)
    p = ckpt / 'model.safetensors'
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    proc = run_cli(['val', CONFIG, '--work-dir', str(tmp_path / 'v'), '--checkpoint', str(ckpt),
                    '--cfg-options', *SMALL])
    assert proc.returncode != 0
    assert 'model.safetensors' in proc.stderr and 'Traceback' not in proc.stderr


# ---- config / hooks ----------------------------------------------------------------------------
def test_config_prints_resolved_config_as_python(tmp_path):
    proc = _ok(run_cli(['config', CONFIG, '--cfg-options', 'train_cfg.max_epochs=7',
                        'model.hidden=33', 'load_from=None']))
    ns: dict = {}
    exec(compile(proc.stdout, 'printed-config', 'exec'), ns)  # valid Python
    assert ns['train_cfg']['max_epochs'] == 7
    assert ns['model']['hidden'] == 33
    assert ns['load_from'] is None
    assert ns['train_dataloader']['dataset']['type'] == 'SpiralDataset'  # from _base_
    assert '_base_' not in ns


def test_hooks_prints_stages_with_names_and_priorities():
    proc = _ok(run_cli(['hooks', CONFIG]))
    out = proc.stdout
    assert 'after_train_iter:' in out and 'before_train:' in out
    section = out.split('after_train_iter:')[1].split(':\n')[0]
    for name in ('IterTimerHook', 'LoggerHook', 'ParamSchedulerHook', 'CheckpointHook'):
        assert name in section, section
    assert section.index('IterTimerHook') < section.index('LoggerHook') < section.index('CheckpointHook')
    assert 'NORMAL' in out and 'VERY_LOW' in out
    assert 'Traceback' not in proc.stderr


# ---- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize('option, needle', [
    ('train_cfg.max_epoch=3', 'train_cfg.max_epoch'),
    ('model.type=NoSuchModel', 'model.type'),
    ('train_dataloader.sampler.type=NoSuchSampler', 'train_dataloader.sampler'),
])
def test_config_error_exits_2_naming_key_path(tmp_path, option, needle):
    proc = run_cli(['train', CONFIG, '--work-dir', str(tmp_path / 'w'), '--cfg-options', option])
    assert proc.returncode == 2, f'{proc.returncode}\n{proc.stdout}\n{proc.stderr}'
    assert needle in proc.stderr
    assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout
    assert not (tmp_path / 'w' / 'checkpoints').exists()


def test_missing_config_file_exits_2(tmp_path):
    proc = run_cli(['config', str(tmp_path / 'nope.py')])
    assert proc.returncode == 2
    assert 'nope.py' in proc.stderr and 'Traceback' not in proc.stderr


def test_bad_cfg_option_syntax_exits_2():
    proc = run_cli(['config', CONFIG, '--cfg-options', 'train_cfg.max_epochs'])
    assert proc.returncode == 2
    assert 'train_cfg.max_epochs' in proc.stderr and 'Traceback' not in proc.stderr


# ---- under accelerate launch ------------------------------------------------------------------
def test_accelerate_launch_two_cpu_processes(tmp_path):
    import torch
    from safetensors.torch import load_file
    accelerate = BIN / 'accelerate'
    if not accelerate.is_file():
        pytest.skip('accelerate CLI not installed')
    config = tmp_path / 'ddp_config.py'  # dump_hook: tests/parts/dump_hook.py
    config.write_text(f"_base_ = [{CONFIG!r}]\n"
                      "custom_imports = dict(imports=['scale_runner.examples.toy', 'dump_hook'])\n"
                      "custom_hooks = [dict(type='DumpRankWeights')]\n")
    work = tmp_path / 'work'
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    cmd = [str(accelerate), 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
           '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', '0',
           '-m', 'scale_runner', 'train', str(config), '--work-dir', str(work), '--cfg-options',
           'train_cfg.max_epochs=2', 'experiment_name=ddp', *SMALL]
    proc = _ok(subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env,
                              cwd=tmp_path))
    assert 'processes: 2' in proc.stdout + proc.stderr
    ckpt = load_file(str(work / 'checkpoints' / 'epoch_2' / 'model.safetensors'))
    r0 = load_file(str(work / 'final_rank0.safetensors'))
    r1 = load_file(str(work / 'final_rank1.safetensors'))
    assert set(r0) == set(r1) == set(ckpt)
    for k in ckpt:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], ckpt[k]), k
    state = json.loads((work / 'checkpoints' / 'epoch_2' / 'state.json').read_text())
    assert state['meta']['world_size'] == 2
    assert {'rng_0.safetensors', 'rng_1.safetensors'} <= {p.name for p in (work / 'checkpoints' / 'epoch_2').iterdir()}
    # only the main process writes scalars: one file, one line per logged step
    assert [p.name for p in work.rglob('scalars.jsonl')] == ['scalars.jsonl']
    records = _scalars(work / 'ddp')
    steps = [r['step'] for r in records if 'loss' in r]
    assert steps and len(steps) == len(set(steps)), steps
    # 512 samples / (64 per process * 2 processes) = 4 steps per epoch
    assert steps == [2, 4, 6, 8], steps
    assert len([r for r in records if 'val/accuracy' in r]) == 1
    # the main log is written once; the other rank has its own file
    logs = sorted(p.name for p in (work / 'ddp').glob('*.log'))
    assert logs == ['ddp.log', 'ddp.rank1.log'], logs


def test_a_run_without_deepspeed_does_not_import_it(tmp_path):
    """Where DeepSpeed is installed but not used, training and checkpointing never import it
    (Accelerate's ``get_state_dict`` would, through ``unwrap_model``: 0.45 s at the first save)."""
    code = textwrap.dedent(f'''
        import sys
        from scale_runner import Config
        from scale_runner.registry import RUNNERS
        cfg = Config.fromfile({CONFIG!r})
        cfg.merge_from_dict({{'work_dir': {str(tmp_path)!r}, 'train_cfg.max_epochs': 1,
                              'train_dataloader.dataset.size': 256, 'val_dataloader.dataset.size': 64}})
        RUNNERS.build(cfg).train()
        print('IMPORTED' if 'deepspeed' in sys.modules else 'NOT_IMPORTED')
    ''')
    proc = _ok(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=pythonpath())))
    assert list((tmp_path / 'checkpoints').glob('epoch_1')), proc.stderr[-2000:]
    assert 'NOT_IMPORTED' in proc.stdout, proc.stdout[-2000:]
