"""Exact resume after SIGKILL: the final checkpoint's model.safetensors is byte-identical to the
one of a run that was never stopped.

Every run (also the uninterrupted baseline) trains a dropout MLP with AdamW, a warmup+cosine
schedule and gradient accumulation; a test-only hook (``SR_KILL``, imported through
``custom_imports`` from tests/parts/sr_resume_parts.py) kills the process with SIGKILL at a
chosen point. One-process runs are forked from the test process (no interpreter start-up, so
the default suite stays fast) or started through the CLI; two-process runs go
through ``accelerate launch`` on gloo. The default suite runs a few representative cases; the
full matrix is marked ``slow`` (``pytest -m slow``).
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
from conftest import PARTS_DIR

PARTS_MODULE = 'sr_resume_parts'  # tests/parts/sr_resume_parts.py

# One pass = 10 iterations (40 samples, 4 per iteration over all processes).
FINAL = {'epoch': 20, 'iter': 16}
KILLS = {
    # epoch loop: checkpoints every 5 iterations, accumulation windows of 3 (5, 10, 20 are
    # inside a window: their checkpoints carry the partial gradients)
    'epoch': {
        'mid_epoch': ['iter:7'],
        'before_save': ['iter:10'],
        'after_save': ['after_save:10'],      # resumes from iter_10: the end of epoch 1's pass,
                                              # written before the epoch's end hooks ran
        'epoch_boundary': ['epoch:1'],
        'during_val': ['val:10'],
        'twice': ['iter:7', 'iter:8'],        # the resumed run dies before its first save
    },
    # iteration loop: checkpoints every 3 iterations, accumulation windows of 2, val every 5
    'iter': {
        'mid_epoch': ['iter:7'],
        'before_save': ['iter:9'],
        'after_save': ['after_save:9'],
        'epoch_boundary': ['iter:11'],        # resumes from iter_9, crosses the pass boundary
        'during_val': ['val:10'],
        'twice': ['iter:4', 'iter:14'],
        'end_of_pass': ['after_save:10'],     # iter_10 (interval 5): the pass is complete
    },
}
# Checkpoint intervals that differ from make_cfg's, per (loop, case); saving changes nothing
# of the training, so the baseline is the same.
CKPT_INTERVAL = {('iter', 'end_of_pass'): 5}


def make_cfg(loop: str = 'iter', nproc: int = 1, workers: int = 0,
             ckpt_interval: int | None = None) -> dict:
    epoch = loop == 'epoch'
    ckpt_interval = ckpt_interval or (5 if epoch else 3)
    return dict(
        custom_imports=dict(imports=[PARTS_MODULE]),
        model=dict(type='DropoutNet'),
        train_dataloader=dict(dataset=dict(type='ResumeData', size=40), batch_size=4 // nproc,
                              num_workers=workers,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        val_dataloader=dict(dataset=dict(type='ResumeData', size=16, seed=1), batch_size=4),
        val_evaluator=dict(type='MSE'),
        val_cfg=dict(),
        train_cfg=(dict(by_epoch=True, max_epochs=2, val_interval=1) if epoch
                   else dict(by_epoch=False, max_iters=FINAL['iter'], val_interval=5)),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.01),
                           accumulative_counts=3 if epoch else 2),
        param_scheduler=[
            dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=2),
            dict(type='CosineAnnealingLR', by_epoch=False, begin=2, end=8, eta_min=1e-4)],
        default_hooks=dict(checkpoint=dict(by_epoch=False, interval=ckpt_interval),
                           logger=dict(interval=5)),
        custom_hooks=[dict(type='KillHook'), dict(type='LateKillHook'), dict(type='SignalHook')],
        randomness=dict(seed=7),
        log_level='WARNING',
    )


@pytest.fixture(scope='session')
def parts_dir(tmp_path_factory):
    """The directory of the parts module (tests/parts, on sys.path through conftest), imported
    here; subprocesses get it on their PYTHONPATH (``_env``)."""
    importlib.import_module(PARTS_MODULE)
    # Forked runs inherit what this process imported: building an optimizer the first time
    # imports torch._dynamo (seconds), so do it once here rather than in every child.
    import torch
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    import accelerate  # noqa: F401
    return PARTS_DIR


def _env(parts_dir: Path, kill: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1',
               PYTHONPATH=os.pathsep.join([str(parts_dir), os.environ.get('PYTHONPATH', '')]))
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SR_KILL',
                'SR_SIGNAL', 'SR_SIGNAL_IN_SAVE', 'SLURM_JOB_ID'):
        env.pop(var, None)
    if kill:
        env['SR_KILL'] = kill
    return env


def run_forked(cfg: dict, work: Path, kill: str | None = None, resume: bool = False,
               env: dict | None = None) -> int:
    """Train in a forked child of this process; return its exit code (-9: SIGKILLed; the code
    of a SystemExit, e.g. a preemption's)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            for var in ('SR_KILL', 'SR_SIGNAL', 'SR_SIGNAL_IN_SAVE', 'SLURM_JOB_ID'):
                os.environ.pop(var, None)
            if kill:
                os.environ['SR_KILL'] = kill
            os.environ.update(env or {})
            from accelerate.state import AcceleratorState, GradientState

            from scale_runner import Config, Runner
            AcceleratorState._reset_state(True)
            GradientState._reset_state()
            runner = Runner.from_cfg(Config({**cfg, 'work_dir': str(work), 'resume': resume}))
            runner.train()
            runner.close()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_cli(cfg: dict, work: Path, parts_dir: Path, nproc: int = 1, kill: str | None = None,
            resume: bool = False, env: dict | None = None) -> subprocess.CompletedProcess:
    """Train through the CLI in a new process (``accelerate launch`` for 2 processes)."""
    cfg_file = work.parent / f'{work.name}.json'
    cfg_file.write_text(json.dumps(cfg))
    args = ['train', str(cfg_file), '--work-dir', str(work)] + (['--resume'] if resume else [])
    if nproc == 1:
        cmd = [sys.executable, '-m', 'scale_runner', *args]
    else:
        cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes',
               str(nproc), '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend',
               'no', '--main_process_port', '0', '-m', 'scale_runner', *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**_env(parts_dir, kill), **(env or {})}, cwd=work.parent)


def final_model(work: Path, loop: str) -> bytes:
    ckpt = work / 'checkpoints' / f'iter_{FINAL[loop]}'
    assert (ckpt / 'manifest.json').is_file(), f'{ckpt} was not completely written'
    return (ckpt / 'model.safetensors').read_bytes()


_BASELINES: dict = {}


def baseline(tmp_path_factory, parts_dir, loop, nproc=1, workers=0) -> bytes:
    """The uninterrupted run's final weights (computed once per configuration)."""
    key = (loop, nproc, workers)
    if key not in _BASELINES:
        work = tmp_path_factory.mktemp(f'baseline_{loop}_{nproc}_{workers}') / 'work'
        cfg = make_cfg(loop, nproc, workers)
        if nproc == 1:
            assert run_forked(cfg, work) == 0
        else:
            proc = run_cli(cfg, work, parts_dir, nproc)
            assert proc.returncode == 0, proc.stderr[-3000:]
        _BASELINES[key] = final_model(work, loop)
    return _BASELINES[key]


def kill_and_resume(tmp_path, parts_dir, loop, case, nproc=1, workers=0, via='fork') -> bytes:
    cfg = make_cfg(loop, nproc, workers, CKPT_INTERVAL.get((loop, case)))
    work = tmp_path / 'work'
    for i, kill in enumerate(KILLS[loop][case]):
        if via == 'fork':
            code, out = run_forked(cfg, work, kill=kill, resume=i > 0), ''
        else:
            proc = run_cli(cfg, work, parts_dir, nproc, kill=kill, resume=i > 0)
            code, out = proc.returncode, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert code != 0, f'{kill}: the run was not killed (exit {code})\n{out}'
        if nproc == 1:
            assert code == -signal.SIGKILL, f'{kill}: exit {code}\n{out}'
        assert not (work / 'checkpoints' / f'iter_{FINAL[loop]}').exists()
    if via == 'fork':
        assert run_forked(cfg, work, resume=True) == 0
    else:
        proc = run_cli(cfg, work, parts_dir, nproc, resume=True)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return final_model(work, loop)


# ---- the default suite: a few representative cases ------------------------------------------
@pytest.mark.parametrize('loop, case, workers', [
    ('iter', 'after_save', 0),      # checkpoint inside an accumulation window, then killed
    ('epoch', 'twice', 0),          # killed twice in a row, the second time before any save
    ('epoch', 'during_val', 0),     # killed during validation
    ('iter', 'epoch_boundary', 2),  # dataloader workers, crossing a pass boundary
    ('iter', 'end_of_pass', 0),     # resumed from a checkpoint written after a pass's last batch
    ('epoch', 'after_save', 0),     # the same point in an epoch loop, before the epoch ends
])
def test_sigkill_and_resume_is_byte_identical(tmp_path, tmp_path_factory, parts_dir, loop, case,
                                              workers):
    expected = baseline(tmp_path_factory, parts_dir, loop, 1, workers)
    assert kill_and_resume(tmp_path, parts_dir, loop, case, 1, workers) == expected


def test_cli_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tmp_path_factory, parts_dir):
    """The user's path: killed mid-epoch, then `scale-runner train CFG --resume` (a new process)."""
    expected = baseline(tmp_path_factory, parts_dir, 'epoch', 1, 0)
    cfg, work = make_cfg('epoch'), tmp_path / 'work'
    assert run_forked(cfg, work, kill='iter:7') == -signal.SIGKILL
    proc = run_cli(cfg, work, parts_dir, resume=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert final_model(work, 'epoch') == expected


def test_kill_before_save_leaves_no_half_checkpoint(tmp_path, parts_dir):
    cfg = make_cfg('iter')
    work = tmp_path / 'work'
    assert run_forked(cfg, work, kill='iter:9') == -signal.SIGKILL
    names = sorted(p.name for p in (work / 'checkpoints').iterdir())
    assert names == ['iter_3', 'iter_6', 'latest'], names
    assert (work / 'checkpoints' / 'latest').read_text().strip() == 'iter_6'


def test_mid_window_checkpoint_carries_each_ranks_partial_gradients(tmp_path, parts_dir):
    from scale_runner.checkpoint import read_checkpoint
    cfg = make_cfg('iter')  # windows of 2: iter_3 and iter_9 are mid-window, iter_6 is not
    work = tmp_path / 'work'
    assert run_forked(cfg, work, kill='iter:10') == -signal.SIGKILL
    root = work / 'checkpoints'
    assert (root / 'iter_3' / 'grad_0.safetensors').is_file()
    assert not (root / 'iter_6' / 'grad_0.safetensors').exists()
    grads = read_checkpoint(root / 'iter_9')['rank']['grad']
    assert set(grads) == {'net.0.weight', 'net.0.bias', 'net.3.weight', 'net.3.bias'}
    assert any(g.abs().sum() > 0 for g in grads.values())


# ---- sampler position: skipped samples are never read, resume time is flat -------------------
def _big_cfg(size: int, max_iters: int) -> dict:
    cfg = make_cfg('iter')
    cfg['train_dataloader']['dataset']['size'] = size
    cfg['train_dataloader']['batch_size'] = 8
    cfg['train_cfg'] = dict(by_epoch=False, max_iters=max_iters, val_interval=10**9)
    cfg['optim_wrapper']['accumulative_counts'] = 1
    cfg['default_hooks'] = dict(checkpoint=dict(by_epoch=False, interval=10**9), logger=None)
    cfg['custom_hooks'] = []
    return cfg


def _move_checkpoint(ckpt: Path, iters: int) -> None:
    """Rewrite a checkpoint's counters to iteration ``iters`` of the first pass (and its
    manifest), as if it had been saved there."""
    import zlib
    doc = json.loads((ckpt / 'state.json').read_text())
    doc['train_state'].update(iter=iters, inner_iter=iters, epoch=0)
    data = json.dumps(doc).encode()
    (ckpt / 'state.json').write_bytes(data)
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    manifest['files']['state.json'] = {'size': len(data), 'chunk_size': 1 << 20, 'crc32': [zlib.crc32(data)]}
    (ckpt / 'manifest.json').write_text(json.dumps(manifest))


def _resume_reads(tmp_path, parts_dir, position: int, size: int = 80_000):
    """Resume at ``position`` for 2 iterations; return (samples read, seconds in train())."""
    from scale_runner import Config, Runner
    work = tmp_path / f'at_{position}'
    runner = Runner.from_cfg(Config({**_big_cfg(size, 1), 'work_dir': str(work)}))
    runner.train()
    runner.close()
    ckpt = work / 'checkpoints' / 'iter_1'
    _move_checkpoint(ckpt, position)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    runner = Runner.from_cfg(Config({**_big_cfg(size, position + 2), 'work_dir': str(work),
                                     'resume': str(ckpt)}))
    t0 = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - t0
    runner.close()
    assert runner.iter == position + 2
    return len(runner.train_loop.dataloader.dataset.reads), seconds


def test_resume_reads_only_remaining_samples_and_time_does_not_grow(tmp_path, parts_dir):
    early_reads, early = _resume_reads(tmp_path, parts_dir, 10)
    late_reads, late = _resume_reads(tmp_path, parts_dir, 9_900)  # of 10,000 batches
    # 2 batches trained + at most Accelerate's one-batch lookahead; nothing before the position
    assert 16 <= early_reads <= 24 and 16 <= late_reads <= 24, (early_reads, late_reads)
    # a position 1000x further costs no more than noise (reading 9,900 batches would take
    # seconds); generous bound for a loaded machine
    assert late < early * 3 + 1.0, (early, late)


# ---- the full matrix ------------------------------------------------------------------------
MATRIX = ([(loop, case, 1, 0) for loop in KILLS for case in KILLS[loop]]
          + [(loop, case, nproc, workers) for loop in KILLS for nproc in (1, 2)
             for workers in (0, 2) for case in ('mid_epoch', 'twice')
             if (nproc, workers) != (1, 0)]
          + [(loop, case, 2, 0) for loop in KILLS
             for case in ('before_save', 'after_save', 'epoch_boundary', 'during_val')]
          + [('iter', 'end_of_pass', 2, 0)])


@pytest.mark.slow
@pytest.mark.parametrize('loop, case, nproc, workers', MATRIX)
def test_resume_matrix(tmp_path, tmp_path_factory, parts_dir, loop, case, nproc, workers):
    expected = baseline(tmp_path_factory, parts_dir, loop, nproc, workers)
    via = 'fork' if nproc == 1 else 'cli'
    assert kill_and_resume(tmp_path, parts_dir, loop, case, nproc, workers, via=via) == expected
