"""Preemption: a signal means 'checkpoint at the next iteration boundary, then exit 128+signum'."""
from __future__ import annotations

import json
import os
import signal
import stat

import pytest

from test_resume import (FINAL, baseline, final_model, make_cfg, parts_dir, run_cli,  # noqa: F401
                         run_forked)

CODES = {'SIGTERM': 143, 'SIGINT': 130, 'SIGUSR1': 138}


def _scalars(work):
    out = {}
    for f in work.glob('*/scalars.jsonl'):
        out[f.parent.name] = [json.loads(line) for line in f.read_text().splitlines()]
    return out


@pytest.mark.parametrize('name', ['SIGTERM', 'SIGINT', 'SIGUSR1'])
def test_signal_saves_at_next_iteration_and_exits_128_plus_signum(tmp_path, tmp_path_factory,
                                                                  parts_dir, name):
    cfg, work = make_cfg('iter'), tmp_path / 'work'
    code = run_forked(cfg, work, env={'SR_SIGNAL': f'{name}:5'})
    assert code == CODES[name] == 128 + getattr(signal, name)
    root = work / 'checkpoints'
    assert (root / 'latest').read_text().strip() == 'preempt_iter_5'
    from scale_runner.checkpoint import read_checkpoint
    state = read_checkpoint(root / 'preempt_iter_5')['state']
    assert state['train_state']['iter'] == 5
    # the resumed run ends with the weights of a run that was never interrupted
    assert run_forked(cfg, work, resume=True) == 0
    assert final_model(work, 'iter') == baseline(tmp_path_factory, parts_dir, 'iter')
    # the preemption checkpoint is dropped once a newer periodic one exists
    assert not (root / 'preempt_iter_5').exists()


def _scontrol_stub(tmp_path):
    """A PATH whose ``scontrol`` records its arguments, and the record's path."""
    bindir = tmp_path / 'bin'
    bindir.mkdir()
    record = tmp_path / 'scontrol_args'
    stub = bindir / 'scontrol'
    stub.write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    return f'{bindir}{os.pathsep}{os.environ["PATH"]}', record


def test_sigterm_under_slurm_saves_without_a_requeue(tmp_path, parts_dir):
    """scancel sends SIGTERM: the job saves and stops, and is not requeued (only SIGUSR1, the
    time-limit warning, requeues), so a cancelled job stays cancelled."""
    path, record = _scontrol_stub(tmp_path)
    cfg, work = make_cfg('iter'), tmp_path / 'work'
    env = {'SR_SIGNAL': 'SIGTERM:4', 'SLURM_JOB_ID': '4242', 'PATH': path}
    assert run_forked(cfg, work, env=env) == 143
    assert not record.exists()
    assert (work / 'checkpoints' / 'latest').read_text().strip() == 'preempt_iter_4'


def test_slurm_requeue_and_second_signal_during_save(tmp_path, tmp_path_factory, parts_dir):
    """Under SLURM the main process runs `scontrol requeue $SLURM_JOB_ID`; SIGTERM and SIGINT
    arriving while the checkpoint is written change nothing (exit code of the first signal)."""
    path, record = _scontrol_stub(tmp_path)
    cfg, work = make_cfg('iter'), tmp_path / 'work'
    env = {'SR_SIGNAL': 'SIGUSR1:4', 'SR_SIGNAL_IN_SAVE': 'SIGTERM,SIGINT',
           'SLURM_JOB_ID': '4242', 'PATH': path}
    assert run_forked(cfg, work, env=env) == 138
    assert record.read_text().split('\n')[0] == 'requeue 4242'
    root = work / 'checkpoints'
    assert (root / 'latest').read_text().strip() == 'preempt_iter_4'
    assert not [p for p in root.iterdir() if p.name.startswith('.')], 'temporary files left'
    from scale_runner.checkpoint import find_resumable
    assert find_resumable(root)['state']['train_state']['iter'] == 4  # verified, complete
    assert run_forked(cfg, work, resume=True) == 0
    assert final_model(work, 'iter') == baseline(tmp_path_factory, parts_dir, 'iter')


def test_signal_at_a_checkpoint_iteration_does_not_save_twice(tmp_path, parts_dir):
    cfg, work = make_cfg('iter'), tmp_path / 'work'
    assert run_forked(cfg, work, env={'SR_SIGNAL': 'SIGTERM:6'}) == 143
    root = work / 'checkpoints'
    assert (root / 'latest').read_text().strip() == 'iter_6'
    assert not list(root.glob('preempt_*'))


def test_cli_preemption_exit_code_and_step_numbering(tmp_path, parts_dir):
    """Through the CLI: exit 143; the resumed run continues the step numbering (no overlap)."""
    cfg, work = make_cfg('iter'), tmp_path / 'work'
    cfg['experiment_name'] = 'first'
    proc = run_cli(cfg, work, parts_dir, env={'SR_SIGNAL': 'SIGTERM:7'})
    assert proc.returncode == 143, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'SIGTERM' in proc.stdout + proc.stderr
    cfg['experiment_name'] = 'second'
    assert run_forked(cfg, work, resume=True) == 0
    runs = _scalars(work)
    first = [r['step'] for r in runs['first'] if 'loss' in r]
    second = [r['step'] for r in runs['second'] if 'loss' in r]
    assert first == [5] and second == [10, 15], (first, second)


@pytest.mark.slow
def test_two_processes_agree_when_only_rank_1_is_signalled(tmp_path, tmp_path_factory, parts_dir):
    cfg, work = make_cfg('iter', nproc=2), tmp_path / 'work'
    proc = run_cli(cfg, work, parts_dir, nproc=2, env={'SR_SIGNAL': 'SIGTERM:5:1'})
    assert proc.returncode != 0  # the launcher reports the workers' non-zero exit
    out = proc.stdout + proc.stderr
    assert 'exiting with code 143' in out, out[-3000:]
    root = work / 'checkpoints'
    assert (root / 'latest').read_text().strip() == 'preempt_iter_5'
    assert {'rng_0.safetensors', 'rng_1.safetensors'} <= {p.name for p in (root / 'preempt_iter_5').iterdir()}
    proc = run_cli(cfg, work, parts_dir, nproc=2, resume=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert final_model(work, 'iter') == baseline(tmp_path_factory, parts_dir, 'iter', nproc=2)


@pytest.mark.parametrize('loop', ['iter', 'epoch'])
def test_signal_during_the_final_validation_stops_it_and_exits_128_plus_signum(tmp_path, parts_dir,
                                                                             loop):
    """After the last iteration the training is complete and saved: the final validation stops
    at its next batch, the log says what happened, and the exit code says the run was stopped."""
    cfg, work = make_cfg(loop), tmp_path / 'work'
    seen = tmp_path / 'val_batches'
    proc = run_cli(cfg, work, parts_dir, env={'SR_SIGNAL_IN_VAL': f'SIGTERM:{FINAL[loop]}',
                                              'SR_VAL_SEEN': str(seen)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 143, out[-3000:]
    assert 'SIGTERM received during the final validation: the training finished and its last ' \
           f'checkpoint {work / "checkpoints" / f"iter_{FINAL[loop]}"} is complete' in out, out[-3000:]
    assert seen.read_text().split() == ['0']  # stopped at the batch after the signal (of 4)
    root = work / 'checkpoints'
    assert (root / 'latest').read_text().strip() == f'iter_{FINAL[loop]}'
    from scale_runner.checkpoint import find_resumable
    assert find_resumable(root)['state']['train_state']['iter'] == FINAL[loop]
