"""CheckpointHook: periodic, crash-safe checkpoints with retention, and best checkpoints."""
from __future__ import annotations

import math
import re
import shutil
import signal
import time
from pathlib import Path

from ..collective import agree_max, cpu_group
from ..errors import ConfigError
from ..metric_rules import RULES, infer_rule
from ..registry import HOOKS
from .hook import Hook
from .preemption_hook import PreemptionHook, preempt_checkpoints

DEFAULT_TIME_INTERVAL = 1800  # s: iteration loops with interval=None; epoch loops save every epoch


@HOOKS.register_module()
class CheckpointHook(Hook):
    """Save every ``interval`` epochs (``by_epoch``) or iterations, and at the end (``save_last``).

    The default policy, for a run that configures nothing (``interval=None``): every epoch in
    an epoch loop; in an iteration loop every ``DEFAULT_TIME_INTERVAL`` seconds (30 minutes) of
    wall-clock time, so a fast small model does not save every few seconds and a slow large
    one is not left hours without a checkpoint; always at the end; and only the newest
    ``max_keep_ckpts=3`` periodic checkpoints are kept (``-1`` keeps all). The policy in force
    is logged once when training starts.

    ``time_interval`` (seconds): also save when that much time has passed since the last save
    (or the start), checked after every iteration; the ranks agree on it in the all-reduce that
    preemption already does (named ``iter_<N>`` in an epoch loop too).

    ``by_epoch=None`` follows the train loop. Older checkpoints are deleted only after a newer
    one is completely written. ``filename_tmpl`` defaults to ``'epoch_{}'`` / ``'iter_{}'``.
    Nothing is saved before ``save_begin`` (epochs or iterations), and, as in MMEngine, the
    interval counts from it: ``save_begin=3, interval=2`` saves 3, 5, 7, ... (and the last).
    ``save_begin=0`` (the default) saves at multiples of ``interval``. ``save_optimizer`` /
    ``save_param_scheduler=False`` leave those states out (such a checkpoint cannot be resumed
    exactly).

    ``save_best``: ``'auto'`` (the first metric of each validation), a metric key, or a list
    of keys. After every validation during training whose metric beats the best so far (by
    ``rule``: ``'greater'``/``'less'``, inferred for common names, or a list of rules), a
    checkpoint ``best_<key>_<epoch|iter>_<N>`` is written; only the newest ``max_keep_best``
    of each key are kept (1 by default), separately from the periodic retention. The best
    scores are published as ``runner.best_scores`` (``{key: score}``) and saved with every
    checkpoint, so they survive a resume.

    ``preemption=True`` (default) handles SIGTERM / SIGINT / SIGUSR1 during training: a
    checkpoint ``preempt_iter_<N>`` at the next iteration boundary, then exit ``128 + signum``
    (see :mod:`scale_runner.hooks.preemption_hook`); ``preemption=False`` leaves signals alone.
    The final validation runs inside the train loop, after the last iteration and its
    checkpoint, before ``after_train``, while the handlers are still installed: a signal then
    is logged (``SIGTERM received during the final validation: the training finished and its
    last checkpoint <path> is complete; stopping with exit code 143``), the validation stops
    at its next batch (a scheduler's grace period is short), and the process exits ``128 + signum``, so the scheduler sees a run that did not
    complete. A signal during a checkpoint is only recorded: the checkpoint is always
    complete before the exit.

    A save that fails (disk full, quota, permissions; on any rank) raises one
    ``CheckpointError`` on every rank naming the checkpoint, the bytes it needed, the free
    space and the previous checkpoint, which stays intact with ``latest`` pointing at it; the
    temporary directory is removed. Debris under a name a save needs (a plain file, link or
    directory without a manifest called like the checkpoint; a directory or link called
    ``latest``) is renamed to ``<name>.debris-<time>-<pid>`` with a warning, never deleted;
    retention deletes only checkpoints this hook wrote and ``preempt_iter_<N>`` directories.

    ``async_save=True``: the loop stops only while the state is copied to host memory; the
    files are written in the background (one save in flight; retention after it completes).
    A failed background write stops every rank at the next iteration with its
    ``CheckpointError``; the end of training, an exception and a preemption wait for it.
    """

    priority = 'VERY_LOW'

    def __init__(self, interval: int | None = None, by_epoch: bool | None = None,
                 save_optimizer: bool = True, save_param_scheduler: bool = True,
                 out_dir: str | None = None, max_keep_ckpts: int = 3, save_last: bool = True, save_begin: int = 0,
                 filename_tmpl: str | None = None, save_best: str | list | None = None,
                 rule: str | list | None = None, max_keep_best: int = 1,
                 preemption: bool | dict = True, time_interval: float | None = None,
                 async_save: bool = False):
        if interval is not None and (not isinstance(interval, int) or isinstance(interval, bool)):
            raise ConfigError(f'default_hooks.checkpoint.interval must be an int (<= 0: only at the '
                              f'end) or None (the default policy), got {interval!r}')
        if not isinstance(max_keep_ckpts, int) or isinstance(max_keep_ckpts, bool) or max_keep_ckpts == 0:
            raise ConfigError(f'default_hooks.checkpoint.max_keep_ckpts must be a positive int, or -1 '
                              f'to keep every checkpoint, got {max_keep_ckpts!r}')
        if filename_tmpl is not None and (not isinstance(filename_tmpl, str) or '{}' not in filename_tmpl):
            raise ConfigError(f"default_hooks.checkpoint.filename_tmpl must be a string with '{{}}' "
                              f"for the epoch/iteration, e.g. 'epoch_{{}}', got {filename_tmpl!r}")
        if filename_tmpl is not None and ('/' in filename_tmpl or filename_tmpl.startswith('.')):
            raise ConfigError(f'default_hooks.checkpoint.filename_tmpl {filename_tmpl!r} must name a '
                              f'directory inside out_dir (no "/", no leading ".")')
        if not isinstance(max_keep_best, int) or max_keep_best == 0:
            raise ConfigError(f'default_hooks.checkpoint.max_keep_best must be a non-zero int '
                              f'(-1 keeps every best checkpoint), got {max_keep_best!r}')
        if time_interval is not None and (isinstance(time_interval, bool)
                                          or not isinstance(time_interval, (int, float))
                                          or not time_interval > 0):
            raise ConfigError(f'default_hooks.checkpoint.time_interval must be a positive number of '
                              f'seconds (e.g. 1800) or None, got {time_interval!r}')
        if not isinstance(async_save, bool):
            raise ConfigError(f'default_hooks.checkpoint.async_save must be True or False, got '
                              f'{async_save!r}')
        self.async_save = async_save
        self.interval = interval
        self.time_interval = time_interval
        self.by_epoch = by_epoch
        self.save_optimizer = save_optimizer
        self.save_param_scheduler = save_param_scheduler
        self.out_dir = out_dir
        self.max_keep_ckpts = max_keep_ckpts
        self.save_last = save_last
        self.save_begin = save_begin
        self.filename_tmpl = filename_tmpl
        self.max_keep_best = max_keep_best
        self.save_best, self.rules = self._check_best(save_best, rule)
        self.best: dict[str, dict] = {}  # key -> {'score': float, 'ckpts': [names]}
        self.last_saved_iter: int | None = None
        self._saved: list[str] = []
        self._training = False
        self._local, self._next_iter, self._next_time = False, 0, math.inf  # set by before_train
        self.preemption = (PreemptionHook(**(preemption if isinstance(preemption, dict) else {}))
                           if preemption else None)

    @staticmethod
    def _check_best(save_best, rule) -> tuple[list | None, list]:
        if save_best is None:
            if rule is not None:
                raise ConfigError('default_hooks.checkpoint.rule is set but save_best is not: '
                                  "add save_best='auto' (or a metric key)")
            return None, []
        keys = [save_best] if isinstance(save_best, str) else list(save_best)
        if not keys or not all(isinstance(k, str) and k for k in keys):
            raise ConfigError(f"default_hooks.checkpoint.save_best must be 'auto', a metric key or a "
                              f'list of keys, got {save_best!r}')
        if 'auto' in keys and len(keys) > 1:
            raise ConfigError("default_hooks.checkpoint.save_best: 'auto' cannot be combined with keys")
        rules = rule if isinstance(rule, (list, tuple)) else [rule] * len(keys)
        if len(rules) != len(keys):
            raise ConfigError(f'default_hooks.checkpoint.rule has {len(rules)} entries for '
                              f'{len(keys)} save_best keys: give one rule per key')
        for r in rules:
            if r is not None and r not in RULES:
                raise ConfigError(f"default_hooks.checkpoint.rule must be 'greater' or 'less', got {r!r}")
        # Known keys: infer now, so a missing rule fails before training, not after an epoch.
        rules = [r if r is not None or k == 'auto' else infer_rule(k) for k, r in zip(keys, rules)]
        return keys, rules

    def before_train(self, runner) -> None:
        if self.by_epoch is None:
            self.by_epoch = runner.state.max_epochs is not None
        if self.filename_tmpl is None:
            self.filename_tmpl = 'epoch_{}' if self.by_epoch else 'iter_{}'
        if self.interval is None:
            self.interval = 1 if self.by_epoch else 0
            if not self.by_epoch and self.time_interval is None:
                self.time_interval = DEFAULT_TIME_INTERVAL
        self._next_time = time.monotonic() + self.time_interval if self.time_interval else math.inf
        self._group = None  # for the clock's agreement when no PreemptionHook does it
        if self.time_interval and self.preemption is None and runner.accelerator.num_processes > 1:
            self._group = cpu_group()
        self.root = Path(self.out_dir) if self.out_dir else runner.checkpoint_dir
        runner.logger.info(f'checkpoints in {self.root}: {self.policy()}')
        self._training = True
        self._publish(runner)
        if self.preemption is not None:
            self.preemption.before_train(runner)
        # One process and no background save: nothing to agree on or poll per iteration, so
        # an iteration with nothing due costs three comparisons (the per-step budget, issue 15).
        self._local = not self.async_save and self._group is None and (
            self.preemption is None or self.preemption._world == 1)
        self._next_iter = self._next_due(runner.state.iter, runner.state.max_iters)

    def policy(self) -> str:
        """The checkpoint policy in words, e.g. ``every 1000 iterations and at the end, ...``."""
        unit = 'epoch' if self.by_epoch else 'iteration'
        when = [f'every {self.interval} {unit}s' if self.interval > 1 else f'every {unit}'] \
            if self.interval > 0 else []
        if self.time_interval:
            t = self.time_interval
            when.append(f'every {t:g} s' if t < 60 else f'every {t / 60:.3g} min' if t < 3600
                        else f'every {t / 3600:.3g} h')
        if self.save_last:
            when.append('at the end')
        if self.save_begin:
            when.append(f'from {unit} {self.save_begin}')
        keep = 'all kept' if self.max_keep_ckpts < 0 else f'the newest {self.max_keep_ckpts} kept'
        text = f'{" and ".join(when) or "never (interval <= 0, save_last=False)"}, {keep}'
        if self.save_best:
            text += f'; best by {", ".join(self.save_best)} (newest {self.max_keep_best} kept)'
        if self.preemption is not None:
            names = ', '.join(signal.Signals(s).name for s in self.preemption.signals)
            text += f'; on {names}: a checkpoint, then exit 128+signal'
        return text

    def after_train(self, runner) -> None:
        self._training = False
        if self.preemption is not None:
            self.preemption.after_train(runner)

    def after_run(self, runner) -> None:
        if self.preemption is not None:
            self.preemption.after_run(runner)

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.preemption is not None:
            self.preemption.after_val_iter(runner, batch_idx)

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch and self._due(runner.epoch, runner.state.max_epochs):
            self._save(runner, runner.epoch)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if (self._local and runner.state.iter < self._next_iter and time.monotonic() < self._next_time
                and not (self.preemption is not None and self.preemption.signum)):
            return
        self._iteration_end(runner)

    def _iteration_end(self, runner) -> None:
        """A save that is due, late by the clock or asked for by a signal; with several
        processes, the ranks' agreement on it (every rank, every iteration)."""
        if self.async_save:
            runner.poll_checkpoint()  # a failed background write stops every rank here
        state = runner.state
        late = int(time.monotonic() >= self._next_time)
        preemption, signum = self.preemption, 0
        if preemption is not None:  # one agreement for both (several processes only)
            signum, late = preemption.agree(late) if preemption._world > 1 else (preemption.signum, late)
        elif self._group is not None:
            late = agree_max([late], self._group)[0]
        if not self.by_epoch and (late or self._due(state.iter, state.max_iters)):
            self._save(runner, state.iter)
        elif late:  # an epoch loop: the clock's checkpoint is named by its iteration
            self._save(runner, state.iter, 'iter_{}')
        if self._local:  # the fast path's bound (several processes come here every iteration)
            self._next_iter = self._next_due(state.iter, state.max_iters)
        if signum:
            self.preemption.preempt(runner, signum)

    def _next_due(self, progress: int, last: int | None) -> float:
        """The first iteration after ``progress`` at which :meth:`_due` holds (``inf``: none,
        or an epoch loop, which saves in ``after_train_epoch``)."""
        if self.by_epoch:
            return math.inf
        begin, every = self.save_begin, self.interval
        due = math.inf if every <= 0 else begin if progress < begin else (
            begin + ((progress - begin) // every + 1) * every)
        return min(due, last) if self.save_last and last is not None and progress < last else due

    def _due(self, progress: int, last: int | None) -> bool:
        if progress < self.save_begin:
            return False
        # MMEngine's: the interval counts from save_begin (save_begin=3, interval=2: 3, 5, 7)
        periodic = self.interval > 0 and (progress - self.save_begin) % self.interval == 0
        return periodic or (self.save_last and progress == last)

    def _write(self, runner, name: str, then=None) -> None:
        runner.save_checkpoint(self.root / name, save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler,
                               async_save=self.async_save, then=then)
        self.last_saved_iter = runner.iter
        if self.time_interval:
            self._next_time = time.monotonic() + self.time_interval

    def _save(self, runner, progress: int, template: str | None = None) -> None:
        name = (template or self.filename_tmpl).format(progress)
        runner.wait_checkpoint()  # the lists below change only with no save in flight
        # Listed before saving, so the checkpoint's own copy of the list includes itself.
        if name in self._saved:
            self._saved.remove(name)
        self._saved.append(name)
        self._write(runner, name, then=self._retain if runner.accelerator.is_main_process else None)

    def _retain(self) -> None:
        """Delete what retention drops, once the newer checkpoint is complete (main process)."""
        if self.max_keep_ckpts > 0:
            while len(self._saved) > self.max_keep_ckpts:
                self._remove(self._saved.pop(0))
        # A preemption checkpoint is older than this one: it has served its purpose.
        for old in preempt_checkpoints(self.root):
            self._remove(old.name)

    def _remove(self, name: str) -> None:
        shutil.rmtree(self.root / name, ignore_errors=True)

    # ---- best checkpoints ----------------------------------------------------------------
    def after_val_epoch(self, runner, metrics=None) -> None:
        if not self._training or not self.save_best or not metrics:
            return
        keys, rules = self.save_best, self.rules
        if keys == ['auto']:
            keys = [next(iter(metrics))]
            rules = [rules[0] or infer_rule(keys[0])]
        improved = []
        for key, rule in zip(keys, rules):
            if key not in metrics:
                raise ConfigError(f'default_hooks.checkpoint.save_best: metric {key!r} is not among '
                                  f'the validation metrics {sorted(metrics)}')
            score = float(metrics[key])
            best = self.best.get(key)
            if math.isnan(score) or (best is not None and not RULES[rule](score, best['score'])):
                continue
            improved.append((key, score))
        for key, score in improved:
            runner.wait_checkpoint()  # the lists below change only with no save in flight
            progress = runner.epoch if self.by_epoch else runner.iter
            unit = 'epoch' if self.by_epoch else 'iter'
            name = f'best_{re.sub(r"[^A-Za-z0-9_.-]+", "_", key)}_{unit}_{progress}'
            entry = self.best.setdefault(key, {'score': score, 'ckpts': []})
            entry['score'] = score
            if name in entry['ckpts']:
                entry['ckpts'].remove(name)
            entry['ckpts'].append(name)
            self._publish(runner)
            main = runner.accelerator.is_main_process
            self._write(runner, name, then=(lambda e=entry: self._retain_best(e)) if main else None)
            runner.logger.info(f'best {key} = {score:.6g}: saved {self.root / name}')

    def _retain_best(self, entry: dict) -> None:
        while self.max_keep_best > 0 and len(entry['ckpts']) > self.max_keep_best:
            self._remove(entry['ckpts'].pop(0))

    def _publish(self, runner) -> None:
        runner.best_scores = {k: v['score'] for k, v in self.best.items()}

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {'saved': list(self._saved),
                'best': {k: {'score': v['score'], 'ckpts': list(v['ckpts'])} for k, v in self.best.items()}}

    def load_state_dict(self, state: dict) -> None:
        self._saved = list(state.get('saved', []))
        self.best = {k: {'score': float(v['score']), 'ckpts': list(v['ckpts'])}
                     for k, v in (state.get('best') or {}).items()}

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._publish(runner)
