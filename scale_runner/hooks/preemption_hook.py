"""PreemptionHook: a signal asks for a checkpoint at the next iteration boundary, then an exit.

SIGTERM, SIGINT and SIGUSR1 only record the signal (the handler does nothing else, so a
signal can never interrupt a checkpoint being written; a second one during the save is
ignored). After every train iteration the ranks agree on it (one all-reduce of one integer,
only when there are several processes, over a CPU (gloo) group so that a GPU run never waits
for its device here; on one process the check is an attribute read), then
all of them write ``preempt_iter_<N>`` together (the ``latest`` pointer moves to it), and
exit with code ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, 138 for SIGUSR1).
Under SLURM (``SLURM_JOB_ID`` set), for SIGUSR1 (``requeue_signals``: the warning that
``--signal=USR1@N`` sends before the time limit) the main process first runs
``scontrol requeue $SLURM_JOB_ID``; the requeued job resumes with ``--resume`` (``resume=True``)
and continues the step numbering from the checkpoint. SIGTERM (``scancel``, or a preemption,
which SLURM requeues itself when its PreemptMode says so) saves and exits without a requeue, so
a cancelled job stays cancelled (Lightning's rule).

A signal after the last train iteration was checked — during the final validation or the
final checkpoint — finds the training complete and saved: it is logged, the final validation
stops at its next batch, nothing is requeued, and the process still exits ``128 + signal``,
so that a scheduler does not count a stopped run as completed.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

from ..collective import agree_max, cpu_group
from ..registry import HOOKS
from .hook import Hook

SIGNALS = ('SIGTERM', 'SIGINT', 'SIGUSR1')


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; its code is ``128 + signum``."""


@HOOKS.register_module()
class PreemptionHook(Hook):
    """Checkpoint-and-exit on SIGTERM / SIGINT / SIGUSR1 (see the module docstring).

    ``requeue``: run ``scontrol requeue $SLURM_JOB_ID`` when ``SLURM_JOB_ID`` is set and the
    signal is one of ``requeue_signals`` (SIGUSR1 by default).
    """

    # CheckpointHook runs one of these at the end of its after_train_iter (preemption=True, the
    # default), so nothing else needs registering; as a hook of its own, run it after
    # CheckpointHook, so a checkpoint that hook just wrote is not written twice.
    priority = 'LOWEST'

    def __init__(self, signals: tuple | list = SIGNALS, requeue: bool = True,
                 requeue_signals: tuple | list = ('SIGUSR1',)):
        self.signals = _signals(signals)
        self.requeue = requeue
        self.requeue_signals = _signals(requeue_signals)
        self.signum = 0
        self._previous: dict = {}
        self._world = 1
        self._group = None  # the CPU (gloo) group of the agreement, made by the first run

    def _handler(self, signum, frame) -> None:
        if not self.signum:  # the first signal decides; later ones change nothing
            self.signum = signum

    def before_train(self, runner) -> None:
        self._world = runner.accelerator.num_processes
        if self._world > 1 and self._group is None:
            self._group = cpu_group()
        if threading.current_thread() is not threading.main_thread():
            runner.logger.warning('PreemptionHook: not in the main thread, signals are not handled')
            return
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)

    def _restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def after_train(self, runner) -> None:
        # A signal after the last iteration's check (final validation, final checkpoint): the
        # training is complete and saved, but the run was stopped; say so, exit 128 + signal.
        signum = self.agree()[0] if self._previous else 0
        self._restore()
        if signum:
            self.stop_finished(runner, signum, 'after the last train iteration')

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        """During the final validation (every train iteration done and saved) a signal stops
        at once: a scheduler's grace period is short. Validation during training carries on;
        its signal is handled at the next iteration boundary, where a checkpoint is exact."""
        state = runner.state
        if self._previous and state.max_iters is not None and state.iter >= state.max_iters:
            signum = self.agree()[0]
            if signum:
                self.stop_finished(runner, signum, 'during the final validation')

    def stop_finished(self, runner, signum: int, when: str) -> None:
        """Exit ``128 + signum`` after a complete training whose last checkpoint is written."""
        ckpt_hook = runner.get_hook('CheckpointHook')
        root = getattr(ckpt_hook, 'root', None) or runner.checkpoint_dir
        from ..checkpoint.format import _pointer
        last = _pointer(Path(root))  # what `latest` names, if it is a checkpoint
        saved = f'its last checkpoint {root / last} is complete' if last else 'no checkpoint was written'
        code = 128 + int(signum)
        runner.logger.warning(f'{signal.Signals(signum).name} received {when}: the training '
                              f'finished and {saved}; stopping with exit code {code} (the run '
                              f'did not complete)')
        self._restore()
        raise Preempted(code)

    def after_run(self, runner) -> None:
        self._restore()

    def agree(self, *flags: int) -> list[int]:
        """The signal received (0: none) and ``flags``, each the largest over all ranks: one
        CPU all-reduce, which other per-iteration decisions (CheckpointHook's clock) share."""
        values = [self.signum, *flags]
        return agree_max(values, self._group) if self._world > 1 else values

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        signum = self.agree()[0]
        if signum:
            self.preempt(runner, signum)

    def preempt(self, runner, signum: int) -> None:
        """Save (collectively), requeue under SLURM, exit with ``128 + signum``."""
        name = signal.Signals(signum).name
        ckpt_hook = runner.get_hook('CheckpointHook')
        root = getattr(ckpt_hook, 'root', None) or runner.checkpoint_dir
        if ckpt_hook is not None and ckpt_hook.last_saved_iter == runner.iter:
            path = root / 'latest'  # CheckpointHook has just saved this very iteration
            runner.logger.warning(f'{name} received: iteration {runner.iter} is already saved')
        else:
            runner.logger.warning(f'{name} received: saving a checkpoint at iteration {runner.iter}')
            path = runner.save_checkpoint(root / f'preempt_iter_{runner.iter}')
            if runner.accelerator.is_main_process:
                for old in preempt_checkpoints(root):
                    if old.name != path.name:
                        shutil.rmtree(old, ignore_errors=True)
        if (self.requeue and signum in self.requeue_signals and os.environ.get('SLURM_JOB_ID')
                and runner.accelerator.is_main_process):
            _requeue(runner.logger, os.environ['SLURM_JOB_ID'])
        code = 128 + int(signum)
        runner.logger.warning(f'preempted by {name}: exiting with code {code}; resume with --resume '
                              f'(checkpoint {path})')
        runner.accelerator.wait_for_everyone()
        raise Preempted(code)


def _signals(names) -> list:
    return [getattr(signal, s) if isinstance(s, str) else signal.Signals(s) for s in names]


def preempt_checkpoints(root: Path) -> list[Path]:
    """The preemption checkpoints in ``root``: directories named exactly ``preempt_iter_<N>``
    (not a link, not ``preempt_iter_<N>.debris-...``, which the writer moved aside and no
    retention ever deletes)."""
    return [p for p in Path(root).glob('preempt_iter_*')
            if re.fullmatch(r'preempt_iter_\d+', p.name) and p.is_dir() and not p.is_symlink()]


def _requeue(logger, job_id: str) -> None:
    cmd = ['scontrol', 'requeue', job_id]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.error(f'`{" ".join(cmd)}` failed: {e}; requeue the job by hand')
        return
    if proc.returncode != 0:
        logger.error(f'`{" ".join(cmd)}` exited with {proc.returncode}: {proc.stderr.strip()}')
    else:
        logger.warning(f'requeued SLURM job {job_id}')
