"""Exits a cluster can trust (issue 15): every public module imports in a fresh interpreter,
the default checkpoint policy bounds disk use and says what it is, and processes end with
the right code after everything is flushed (``scale_runner.shutdown``)."""
from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import scale_runner
from scale_runner import Hook

ROOT = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(scale_runner.__path__, 'scale_runner.')
                  if m.name != 'scale_runner.__main__')


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """Each module imported first, with no other module of the package loaded: an import cycle
    shows only when its module comes first. One interpreter, in which every scale_runner
    module is dropped from ``sys.modules`` before the next import (torch and the other
    libraries stay loaded: a fresh interpreter per module took 85 s)."""
    script = ('import importlib, sys, traceback\n'
              'import torch, accelerate, safetensors\n'
              'bad = []\n'
              'for m in sys.argv[1:]:\n'
              '    for name in [n for n in sys.modules if n.split(".")[0] == "scale_runner"]:\n'
              '        del sys.modules[name]\n'
              '    try:\n'
              '        importlib.import_module(m)\n'
              '    except Exception as e:\n'
              '        bad.append(f"{m}: {type(e).__name__}: {e}")\n'
              'print("\\n".join(bad))\n')
    modules = _modules()
    assert 'scale_runner.hooks.preemption_hook' in modules and 'scale_runner.metric_rules' in modules
    proc = subprocess.run([sys.executable, '-c', script, *modules], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


# ---- the default checkpoint policy ----------------------------------------------------------
def _names(work) -> list[str]:
    return sorted(p.name for p in (Path(work) / 'checkpoints').iterdir() if p.name != 'latest')


def test_default_iteration_run_keeps_few_checkpoints_and_logs_its_policy(tmp_path, tiny_parts):
    from scale_runner import Runner
    runner = Runner(**tiny_parts(tmp_path, train_cfg=dict(by_epoch=False, max_iters=50),
                                 log_level='INFO'))
    runner.train()
    runner.close()
    assert _names(tmp_path) == ['iter_50']  # 51 directories before: one per iteration
    log = next(tmp_path.glob('*/*.log')).read_text()
    assert 'checkpoints in ' in log and 'every 30 min and at the end, the newest 3 kept' in log


def test_default_epoch_run_saves_every_epoch_and_keeps_three(tmp_path, tiny_parts):
    from scale_runner import Runner
    runner = Runner(**tiny_parts(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=5)))
    runner.train()
    runner.close()
    assert _names(tmp_path) == ['epoch_3', 'epoch_4', 'epoch_5']
    assert runner.get_hook('CheckpointHook').policy().startswith('every epoch and at the end')


class _Slow(Hook):
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        time.sleep(0.03)


def test_time_interval_saves_on_the_clock(tmp_path, tiny_parts):
    from scale_runner import Runner
    runner = Runner(**tiny_parts(tmp_path, train_cfg=dict(by_epoch=False, max_iters=24),
                                 custom_hooks=[_Slow()], val_cfg=None, val_dataloader=None,
                                 val_evaluator=None,
                                 default_hooks=dict(checkpoint=dict(time_interval=0.1,
                                                                    max_keep_ckpts=-1))))
    runner.train()
    runner.close()
    iters = sorted(int(n.split('_')[1]) for n in _names(tmp_path))
    # about one every 4 iterations of 30 ms (a save takes some ms too), and the last one
    assert 3 <= len(iters) <= 12 and iters[-1] == 24, iters
    assert all(b - a >= 2 for a, b in zip(iters, iters[1:-1])), iters


@pytest.mark.parametrize('bad', [0, -5, 'soon', True])
def test_bad_time_interval_is_a_config_error(bad):
    from scale_runner import ConfigError
    from scale_runner.hooks import CheckpointHook
    with pytest.raises(ConfigError, match='time_interval'):
        CheckpointHook(time_interval=bad)


# ---- ending the process ---------------------------------------------------------------------
def test_exit_process_runs_atexit_flushes_and_keeps_the_code(tmp_path):
    marker = tmp_path / 'atexit.txt'
    script = ('import atexit, sys\n'
              'from scale_runner.shutdown import exit_process\n'
              f'atexit.register(lambda: open({str(marker)!r}, "w").write("ran"))\n'
              'sys.stdout.write("unflushed line")\n'
              'exit_process(3)\n'
              'print("not reached")\n')
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and proc.stdout == 'unflushed line', (proc.returncode, proc.stdout)
    assert marker.read_text() == 'ran'


@pytest.mark.parametrize('exc, code', [(SystemExit(None), 0), (SystemExit(4), 4),
                                       (SystemExit('msg'), 1), (KeyboardInterrupt(), 130),
                                       (ValueError(), 1)])
def test_exit_code_is_the_interpreters(exc, code):
    from scale_runner.shutdown import exit_code
    assert exit_code(exc) == code


def test_cli_exit_codes(tmp_path):
    """Through ``python -m scale_runner`` (the CLI's own exit): 0, a config error's 2, and an
    unexpected exception's 1 with its traceback."""
    from conftest import run_cli
    ok = run_cli(['config', str(ROOT / 'configs' / 'spiral_mlp.py')])
    assert ok.returncode == 0 and 'MLPClassifier' in ok.stdout
    bad = run_cli(['train', str(tmp_path / 'missing.py')])
    assert bad.returncode == 2 and 'Traceback' not in bad.stderr
    (tmp_path / 'boom.py').write_text('raise RuntimeError("boom at load")\n')
    boom = run_cli(['config', str(tmp_path / 'boom.py')])
    assert boom.returncode != 0 and 'boom at load' in boom.stderr


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['cli', 'api'])
def test_finished_two_process_runs_exit_zero(mode):
    """20 consecutive 2-process runs, none aborted at exit (bench/exit_aborts.py: 100)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / 'bench' / 'exit_aborts.py'), '--runs', '20',
                           '--modes', mode], capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0 and f'{mode}: 0 of 20 runs aborted' in proc.stdout, \
        proc.stdout + proc.stderr[-3000:]
