"""Faults of a multi-process job (issue 19): a rank that dies, a rank that hangs, a slow rank.

Real launches over gloo on the CPU: ``torchrun`` (``accelerate launch`` in the slow matrix)
with 2 processes and ``tests/parts/fault_cfg.py`` (12 iterations, checkpoints every 4),
whose ``FaultHook`` (``SR_FAULT``) injects the fault in the launcher's first attempt only.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import PARTS_DIR, pythonpath

CFG = PARTS_DIR / 'fault_cfg.py'
LAUNCH_VARS = ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
               'TORCHELASTIC_RESTART_COUNT', 'TORCHELASTIC_USE_AGENT_STORE')


def _launch(work: Path, *options: str, fault: str = '', restarts: int = 0, accelerate: bool = False,
            env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    full.update(OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath(), SR_FAULT=fault,
                **(env or {}))
    if accelerate:
        launcher = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
                    '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                    '--main_process_port', '0', '--max_restarts', str(restarts)]
    else:
        launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                    '--max-restarts', str(restarts)]
    cmd = [*launcher, '-m', 'scale_runner', 'train', str(CFG), '--work-dir', str(work),
           *(['--cfg-options', *options] if options else [])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work.parent, env=full)


def _ok(proc) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    return out


def _weights(work: Path) -> dict:
    return load_file(work / 'checkpoints' / 'iter_12' / 'model.safetensors')


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k


def _scalars(work: Path) -> list[dict]:
    (path,) = work.glob('*/scalars.jsonl')
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run with a slow rank 1 (20 ms more per forward from iteration 2): the
    weights every recovered run must end with, and the straggler figures."""
    work = tmp_path_factory.mktemp('reference') / 'work'
    work.mkdir()
    out = _ok(_launch(work, fault='slow:1:2:0.02'))
    return work, out


def test_slow_rank_is_named_by_the_per_rank_figures(reference):
    work, out = reference
    rows = [r for r in _scalars(work) if 'compute_time/rank_max' in r]
    assert [r['step'] for r in rows] == [2, 4, 6, 8, 10, 12]
    for r in rows[1:]:  # from iteration 3 on, every window has rank 1's sleeps
        assert r['compute_time/slowest_rank'] == 1
        assert r['compute_time/rank_max'] >= 0.02 > r['compute_time/rank_min']
        # whole iterations wait for the slowest rank: `time` shows almost no spread
        assert r['time/rank_max'] - r['time/rank_min'] < 0.5 * (r['compute_time/rank_max']
                                                                - r['compute_time/rank_min'])
        for key in ('time', 'data_time'):
            assert r[f'{key}/rank_min'] <= r[f'{key}/rank_max'] and r[f'{key}/slowest_rank'] in (0, 1)
    # the console line names the straggler (its spread is far above 10% of an iteration)
    assert 'compute_time/slowest_rank: 1' in out.split('Iter(train) [12/12]')[1].splitlines()[0]


def test_sigkilled_rank_restarts_and_resumes_exactly(tmp_path, reference):
    """rank 1 dies after iteration 6 (checkpoints at 4 and 8); torchrun restarts both workers,
    which resume from iteration 4 by themselves (the launcher's store is shared across the
    restart) and end bit-identical to the uninterrupted run."""
    work = tmp_path / 'work'
    work.mkdir()
    out = _ok(_launch(work, fault='kill:1:6,slow:1:2:0.02', restarts=1))
    assert 'resumed from' in out and 'at epoch 0, iter 4 (restart 1 by the launcher)' in out, out[-3000:]
    assert 'connectFullMesh' not in out
    _same(_weights(work), _weights(reference[0]))


def test_hanging_rank_stops_every_rank_within_the_timeout(tmp_path):
    """rank 1 sleeps forever before iteration 7: with accelerator.timeout=4 every rank exits
    with 124 in seconds (not the backend's 30 minutes), and the main process names rank 1,
    the iteration and where each rank was."""
    work = tmp_path / 'work'
    work.mkdir()
    start = time.monotonic()
    proc = _launch(work, 'accelerator.timeout=4', fault='hang:1:6', timeout=120)
    took = time.monotonic() - start
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert out.count('exitcode  : 124') == 2, out[-3000:]  # both ranks, by the watchdog
    assert took < 60, took  # startup + 6 iterations + 4 s + a few polls
    (main_log,) = [p for p in work.glob('*/*.log') if '.rank' not in p.name]
    log = main_log.read_text()
    assert 'rank 1 did not reach ' in log and 'after iteration 6 within 4 s' in log, log[-3000:]
    assert 'rank 1: after iteration 6, in the train loop' in log and 'FaultHook.before_train_iter' in log
    assert 'rank 0: after iteration 6, in ' in log
    assert (work / 'checkpoints' / 'iter_4' / 'model.safetensors').is_file()  # saved work stays


@pytest.mark.slow
@pytest.mark.parametrize('fault, expected', [
    ('hang:0:6', ['rank 0 did not reach ', 'rank 0: after iteration 6, in the train loop',
                  'FaultHook.before_train_iter']),
    ('collective:0:6', ['the ranks wait in different collectives after iteration 6',
                        'rank 0: after iteration 6, in a torch.distributed all_reduce',
                        'FaultHook.after_train_iter'])], ids=['main_hangs', 'lone_collective'])
def test_other_hangs_are_named(tmp_path, fault, expected):
    """The main process itself stuck in user code (its watchdog thread still reports), and a
    collective entered by rank 0 only."""
    work = tmp_path / 'work'
    work.mkdir()
    proc = _launch(work, 'accelerator.timeout=4', fault=fault, timeout=120)
    out = proc.stdout + proc.stderr
    assert out.count('exitcode  : 124') == 2, out[-3000:]
    for text in expected:
        assert text in out, out[-3000:]


@pytest.mark.slow
def test_hanging_rank_restarts_and_resumes_exactly(tmp_path, reference):
    work = tmp_path / 'work'
    work.mkdir()
    out = _ok(_launch(work, 'accelerator.timeout=4', fault='hang:1:6,slow:1:2:0.02', restarts=1))
    assert 'did not reach' in out and '(restart 1 by the launcher)' in out
    _same(_weights(work), _weights(reference[0]))


@pytest.mark.slow
@pytest.mark.parametrize('how', ['accelerate', 'no_shared_store'])
def test_restart_resumes_exactly_under_other_launch_settings(tmp_path, reference, how):
    """``accelerate launch --max_restarts 1``, and torchrun with
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (the workers' rank 0 hosts the store)."""
    work = tmp_path / 'work'
    work.mkdir()
    env = {'TORCH_DISABLE_SHARE_RDZV_TCP_STORE': '1'} if how == 'no_shared_store' else None
    out = _ok(_launch(work, fault='kill:1:6,slow:1:2:0.02', restarts=1, accelerate=how == 'accelerate',
                      env=env))
    assert '(restart 1 by the launcher)' in out
    _same(_weights(work), _weights(reference[0]))


def test_diagnosis_names_late_and_silent_ranks():
    from scale_runner.watchdog import diagnose

    def rec(it, phase, wait, seq, user=None):
        return dict(iter=it, phase=phase, wait=wait, seq=seq, user=user)
    # rank 2 is an iteration behind; rank 3 stopped reporting (its record did not change)
    first = {0: rec(9, 'the preemption check', True, 5), 1: rec(9, 'the preemption check', True, 5),
             2: rec(8, 'the train loop', False, 5, 'slow_hook (x.py:3)'), 3: rec(9, 'x', True, 4)}
    later = {**first, 0: rec(9, 'the preemption check', True, 6), 1: rec(9, 'the preemption check', True, 6),
             2: rec(8, 'the train loop', False, 6, 'slow_hook (x.py:3)')}
    msg = diagnose(later, first, 4, 60)
    assert msg.startswith('ranks 2, 3 did not reach the preemption check after iteration 9 within 60 s')
    assert 'rank 2: after iteration 8, in the train loop, in slow_hook (x.py:3)' in msg
    assert 'rank 3: not reporting (its process died, or is frozen); last seen after iteration 9' in msg
    # waiting in different collectives: one that only some ranks entered
    odd = {0: rec(3, 'a torch.distributed all_reduce', True, 2), 1: rec(3, 'the preemption check', True, 2)}
    assert diagnose(odd, {r: {**v, 'seq': 1} for r, v in odd.items()}, 2, 5).startswith(
        'the ranks wait in different collectives after iteration 3 for 5 s')
    # every rank in the same collective: nobody is named late
    same = {r: rec(3, 'a gather of every rank', True, 2) for r in range(2)}
    assert diagnose(same, {r: rec(3, 'a gather of every rank', True, 1) for r in range(2)}, 2, 5).startswith(
        'no rank made progress for 5 s after iteration 3, in a gather of every rank')


def test_restart_resumes_from_the_jobs_own_checkpoints(tmp_path, monkeypatch):
    from scale_runner.elastic import resume_on_restart, restart_init_method
    ckpts = tmp_path / 'checkpoints'
    monkeypatch.delenv('TORCHELASTIC_RESTART_COUNT', raising=False)
    assert resume_on_restart(False, ckpts) is False and restart_init_method() is None
    monkeypatch.setenv('TORCHELASTIC_RESTART_COUNT', '2')
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'True')
    assert resume_on_restart(False, ckpts) == 'auto' and resume_on_restart(True, ckpts) is True
    given = tmp_path / 'other' / 'iter_4'
    assert resume_on_restart(given, ckpts) == given  # the job wrote no checkpoint yet
    assert restart_init_method() == 'scale-runner-attempt://'
    monkeypatch.setenv('TORCHELASTIC_USE_AGENT_STORE', 'False')
    assert restart_init_method() is None  # the workers' own store is new on every attempt
