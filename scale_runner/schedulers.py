"""Parameter schedulers with MMEngine's ``begin`` / ``end`` / ``by_epoch`` semantics.

Each entry of ``param_scheduler`` wraps a ``torch.optim.lr_scheduler`` class (or a registered
one). An entry is active for steps ``begin <= t <= end`` (steps are optimizer updates, or
epochs when ``by_epoch=True``), so warmup-then-cosine is two list entries.
"""
from __future__ import annotations

import inspect
import math
from typing import Any

from .checks import check_bool, check_number, check_scheduler_args
from .errors import ConfigError, did_you_mean
from .registry import PARAM_SCHEDULERS

# Constructor parameters that measure a schedule length: they default to ``end - begin`` and
# are converted from epochs to iterations by ``convert_to_iter_based``.
LENGTH_PARAMS = ('total_iters', 'T_max', 'step_size', 'T_0')
MILESTONE_PARAMS = ('milestones',)
# Keys of a ``param_scheduler`` entry read by the runner, not by the scheduler's constructor.
SCHEDULE_KEYS = ('begin', 'end', 'by_epoch', 'convert_to_iter_based')


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
            if not callable(getattr(one, 'step', None)):
                raise ConfigError(f"{where} = {one!r} is not valid: it takes dict(type="
                                  f"'CosineAnnealingLR', ...) (or a list of them) or a built scheduler")
            built.append(one)
            continue
        one = dict(one)
        begin = one.pop('begin', 0)
        end = one.pop('end', math.inf)
        by_epoch = one.pop('by_epoch', True)
        convert = one.pop('convert_to_iter_based', False)
        check_number(begin, f'{where}.begin', low=0, example='begin=0')
        check_number(end, f'{where}.end', low=0, allow_none=True, example='end=1000')
        check_bool(by_epoch, f'{where}.by_epoch')
        check_bool(convert, f'{where}.convert_to_iter_based')
        if end is None:
            end = math.inf
        if not 0 <= begin < end:
            raise ConfigError(f'{where}: need 0 <= begin < end, got begin={begin}, end={end}')
        if 'type' not in one:
            near = did_you_mean('type', [k for k in one if isinstance(k, str)])
            hint = f' ({where}.{near} is not a key: did you mean {where}.type?)' if near else ''
            raise ConfigError(f"{where} needs a type, e.g. dict(type='CosineAnnealingLR'){hint}")
        try:
            cls = PARAM_SCHEDULERS.get(one['type'])
        except KeyError as e:
            raise ConfigError(f'{where}.type: {e.args[0] if e.args else e}') from None
        if cls is None:
            raise ConfigError(f"{where}.type is None: name a scheduler, e.g. type='CosineAnnealingLR'")
        if convert and by_epoch:
            # the values are checked before they are multiplied (a string would be repeated)
            check_scheduler_args(cls, {k: v for k, v in one.items() if k != 'type'}, where)
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
        if math.isfinite(end):
            params = inspect.signature(cls).parameters
            for key in LENGTH_PARAMS:
                if key in params and key not in one and key != 'step_size':
                    one[key] = end - begin
        sched = PARAM_SCHEDULERS.build(one, _cfg_path=where, optimizer=optimizer,
                                       _cfg_extra_keys=SCHEDULE_KEYS, _check=check_scheduler_args,
                                       _wrap_errors=True)
        wrapped = ParamScheduler(sched, begin, end, by_epoch, optimizer)
        if begin > 0:
            # Not active yet: undo the lr change its constructor made.
            for g, lr in zip(optimizer.param_groups, lrs):
                g['lr'] = lr
        built.append(wrapped)
        lrs = [g['lr'] for g in optimizer.param_groups]
    return built
