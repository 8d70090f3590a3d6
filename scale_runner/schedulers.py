"""Parameter schedulers with MMEngine's ``begin`` / ``end`` / ``by_epoch`` semantics.

Each entry of ``param_scheduler`` wraps a ``torch.optim.lr_scheduler`` class (or a registered
one). An entry is active for steps ``begin <= t <= end`` (steps are optimizer updates, or
epochs when ``by_epoch=True``), so warmup-then-cosine is two list entries.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

from .errors import ConfigError
from .registry import PARAM_SCHEDULERS

# Constructor parameters that measure a schedule length: they default to ``end - begin`` and
# are converted from epochs to iterations by ``convert_to_iter_based``.
LENGTH_PARAMS = ('total_iters', 'T_max', 'step_size', 'T_0')
MILESTONE_PARAMS = ('milestones',)


class ParamScheduler:
    """One scheduler of the list: steps its torch scheduler only while active."""

    def __init__(self, scheduler, begin: int, end: float, by_epoch: bool, optimizer):
        self.scheduler = scheduler
        self.begin, self.end, self.by_epoch = begin, end, by_epoch
        self.optimizer = optimizer
        self.last_step = 0  # steps taken (updates or epochs)

    def step(self) -> None:
        self.last_step += 1
        t = self.last_step
        if t == self.begin and self.begin > 0:
            # Becoming active: redo the scheduler's initial step from the current lr, exactly
            # as its constructor did (LinearLR applies start_factor, cosine keeps the lr).
            # A plain step() would not be treated as initial and rescale a recursive schedule.
            self.scheduler.last_epoch = -1
            initial = getattr(self.scheduler, '_initial_step', None)
            (initial or self.scheduler.step)()
        elif self.begin < t <= self.end:
            # Stepping at t == end lands exactly on the schedule's final value.
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {'last_step': self.last_step, 'scheduler': self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state['last_step']
        self.scheduler.load_state_dict(state['scheduler'])

    def __repr__(self) -> str:
        end = 'inf' if math.isinf(self.end) else self.end
        unit = 'epoch' if self.by_epoch else 'iter'
        return f'{type(self.scheduler).__name__}(begin={self.begin}, end={end}, by {unit})'


def build_param_schedulers(cfg: Any, optimizer, epoch_length: int | None) -> list[ParamScheduler]:
    """Build the ``param_scheduler`` list (a dict or a list of dicts) for ``optimizer``."""
    if cfg is None:
        return []
    cfgs = cfg if isinstance(cfg, (list, tuple)) else [cfg]
    lrs = [g['lr'] for g in optimizer.param_groups]
    built = []
    for i, one in enumerate(cfgs):
        where = f'param_scheduler[{i}]' if isinstance(cfg, (list, tuple)) else 'param_scheduler'
        if not isinstance(one, dict):
            built.append(one)
            continue
        one = dict(one)
        begin = one.pop('begin', 0)
        end = one.pop('end', math.inf)
        by_epoch = one.pop('by_epoch', True)
        convert = one.pop('convert_to_iter_based', False)
        if end is None:
            end = math.inf
        if not 0 <= begin < end:
            raise ConfigError(f'{where}: need 0 <= begin < end, got begin={begin}, end={end}')
        if convert and by_epoch:
            if not epoch_length:
                raise ConfigError(f'{where}.convert_to_iter_based needs a train dataloader with a length')
            begin, end = begin * epoch_length, end * epoch_length
            for key in LENGTH_PARAMS:
                if key in one:
                    one[key] = one[key] * epoch_length
            for key in MILESTONE_PARAMS:
                if key in one:
                    one[key] = [m * epoch_length for m in one[key]]
            by_epoch = False
        cls = PARAM_SCHEDULERS.get(one.get('type')) if 'type' in one else None
        if cls is None:
            raise ConfigError(f"{where} needs a type, e.g. dict(type='CosineAnnealingLR')")
        if math.isfinite(end):
            params = inspect.signature(cls).parameters
            for key in LENGTH_PARAMS:
                if key in params and key not in one and key != 'step_size':
                    one[key] = end - begin
        sched = PARAM_SCHEDULERS.build(one, _cfg_path=where, optimizer=optimizer)
        wrapped = ParamScheduler(sched, begin, end, by_epoch, optimizer)
        if begin > 0:
            # Not active yet: undo the lr change its constructor made.
            for g, lr in zip(optimizer.param_groups, lrs):
                g['lr'] = lr
        built.append(wrapped)
        lrs = [g['lr'] for g in optimizer.param_groups]
    return built
