"""EarlyStoppingHook: stop training when a validation metric stops improving."""
from __future__ import annotations

import math

from ..collective import from_main
from ..errors import ConfigError
from ..metric_rules import RULES, infer_rule
from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class EarlyStoppingHook(Hook):
    """MMEngine's ``EarlyStoppingHook``: after each validation during training, compare
    ``metrics[monitor]`` with the best so far.

    - ``rule``: ``'greater'`` or ``'less'``; inferred from the name (``acc``, ``loss``, ...).
    - ``min_delta``: an improvement must beat the best by more than this.
    - ``patience``: stop after this many validations in a row without improvement.
    - ``check_finite``: stop when the metric is NaN or Inf.
    - ``stopping_threshold``: stop as soon as the metric is better than this.
    - ``strict``: a missing ``monitor`` key is an error (otherwise a warning).

    Stopping sets ``runner.train_loop.stop_training`` (epoch loops stop after this epoch, iteration
    loops after this iteration). Rank 0's decision is broadcast, so every rank stops at the same
    point. ``best_score`` and ``wait_count`` are saved in checkpoints and survive a resume.
    """

    priority = 'LOW'

    def __init__(self, monitor: str, rule: str | None = None, min_delta: float = 0.1,
                 strict: bool = False, check_finite: bool = True, patience: int = 5,
                 stopping_threshold: float | None = None):
        if not isinstance(monitor, str) or not monitor:
            raise ConfigError(f'EarlyStoppingHook.monitor must be a metric key, got {monitor!r}')
        if rule is not None and rule not in RULES:
            raise ConfigError(f"EarlyStoppingHook.rule must be 'greater' or 'less', got {rule!r}")
        if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
            raise ConfigError(f'EarlyStoppingHook.patience must be a positive int, got {patience!r}')
        if not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ConfigError(f'EarlyStoppingHook.min_delta must be >= 0, got {min_delta!r}')
        self.monitor = monitor
        if rule is None:
            try:
                rule = infer_rule(monitor)
            except ConfigError:
                raise ConfigError(f'EarlyStoppingHook: cannot tell whether a greater or a smaller '
                                  f"{monitor!r} is better; set rule='greater' or rule='less'") from None
        self.rule = rule
        self.min_delta = float(min_delta)
        self.strict = strict
        self.check_finite = check_finite
        self.patience = patience
        self.stopping_threshold = stopping_threshold
        self.best_score = -math.inf if self.rule == 'greater' else math.inf
        self.wait_count = 0
        self.stopped_at: dict | None = None  # {'epoch', 'iter', 'reason'} once stopped
        self._training = False

    def before_train(self, runner) -> None:
        self._training = True

    def after_train(self, runner) -> None:
        self._training = False

    def _improved(self, score: float) -> bool:
        if self.rule == 'greater':
            return score > self.best_score + self.min_delta
        return score < self.best_score - self.min_delta

    def _decide(self, score: float) -> tuple[bool, str]:
        better = RULES[self.rule]
        if self.check_finite and not math.isfinite(score):
            return True, (f'{self.monitor} = {score} is not finite (best so far {self.best_score:.6g})')
        if self.stopping_threshold is not None and better(score, self.stopping_threshold):
            self.best_score = score
            return True, (f'stopping threshold reached: {self.monitor} = {score:.6g} is '
                          f'{self.rule} than {self.stopping_threshold}')
        if self._improved(score):
            self.best_score, self.wait_count = score, 0
            return False, ''
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f'{self.monitor} did not improve by more than {self.min_delta} in the last '
                          f'{self.wait_count} validations (best {self.best_score:.6g})')
        return False, ''

    def after_val_epoch(self, runner, metrics=None) -> None:
        if not self._training or runner.train_loop is None:
            return
        metrics = metrics or {}
        if self.monitor not in metrics:
            msg = (f'EarlyStoppingHook: monitor {self.monitor!r} is not among the validation metrics '
                   f'{sorted(metrics)}')
            if self.strict:
                raise ConfigError(msg)
            runner.logger.warning(msg + '; early stopping is skipped')
            return
        stop, reason = self._decide(float(metrics[self.monitor]))
        # one decision for all ranks: the main process's
        stop, reason, self.best_score, self.wait_count = from_main(
            (stop, reason, self.best_score, self.wait_count))
        if stop:
            self.stopped_at = {'epoch': runner.epoch, 'iter': runner.iter, 'reason': reason}
            runner.train_loop.stop_training = True
            runner.logger.info(f'early stopping at epoch {runner.epoch}, iter {runner.iter}: {reason}')

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        finite = math.isfinite(self.best_score)
        return {'best_score': self.best_score if finite else None, 'wait_count': self.wait_count,
                'monitor': self.monitor, 'rule': self.rule}

    def load_state_dict(self, state: dict) -> None:
        if state.get('best_score') is not None:
            self.best_score = float(state['best_score'])
        self.wait_count = int(state.get('wait_count', 0))
