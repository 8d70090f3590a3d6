"""Parameter schedulers with MMEngine's ``begin`` / ``end`` / ``by_epoch`` semantics.

Each entry of ``param_scheduler`` wraps a ``torch.optim.lr_scheduler`` class (or a registered
one). As in MMEngine, an entry is active for steps ``begin <= t < end`` (steps are optimizer
updates, or epochs when ``by_epoch=True``): the value at step ``t`` is the schedule's value
``t - begin`` steps in, and it stops changing after step ``end - 1``. So ``LinearLR(begin=0,
end=4)`` reaches the base lr at step 3 (its ``total_iters`` is ``end - begin - 1``), and
``CosineAnnealingLR(begin=4, end=12)`` (``T_max = end - begin``) takes its last value at step
11. Warmup-then-cosine is two list entries.

A built scheduler object (``MultiStepLR(optimizer, ...)``) steps every epoch unless it has a
``by_epoch`` attribute (MMEngine's default is ``by_epoch=True``).
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
# Their defaults, MMEngine's: a schedule that ends at ``end - begin - 1`` (its last active
# step) for the ``total_iters`` ones, ``end - begin`` for the cosine periods.
DEFAULT_LENGTH = {'total_iters': 1, 'T_max': 0, 'T_0': 0}
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
        elif self.begin < t < self.end:  # [begin, end): nothing changes from step `end` on
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
            built.append(wrap_built(one, where, optimizer))
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
                if key in params and key not in one and key in DEFAULT_LENGTH:
                    one[key] = max(end - begin - DEFAULT_LENGTH[key], 0)
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


def wrap_built(scheduler, where: str, optimizer) -> Any:
    """A built scheduler as an entry of the list: one with ``by_epoch`` (ours, or one of the
    user's) as it is; a torch one wrapped to step every epoch over ``[0, inf)``."""
    if isinstance(scheduler, ParamScheduler) or hasattr(scheduler, 'by_epoch'):
        if not callable(getattr(scheduler, 'step', None)):
            raise ConfigError(f'{where} = {scheduler!r} has no step() method')
        return scheduler
    if not callable(getattr(scheduler, 'step', None)) or not hasattr(scheduler, 'state_dict'):
        raise ConfigError(f"{where} = {scheduler!r} is not valid: it takes dict(type="
                          f"'CosineAnnealingLR', ...) (or a list of them) or a built scheduler")
    own = getattr(scheduler, 'optimizer', None)
    if own is not None and optimizer is not None and _torch_opt(own) is not _torch_opt(optimizer):
        raise ConfigError(f'{where}: the built {type(scheduler).__name__} schedules another '
                          f'optimizer than optim_wrapper.optimizer: build it on the same optimizer '
                          f'(optim_wrapper=dict(optimizer=opt), param_scheduler=MultiStepLR(opt, ...))'
                          f' or give a config dict')
    return ParamScheduler(scheduler, 0, math.inf, True, optimizer)


def _torch_opt(optimizer):
    return getattr(optimizer, 'optimizer', optimizer)  # inside Accelerate's / our wrapper


def build_schedulers_for(cfg: Any, optim_wrapper, epoch_length: int | None) -> list:
    """``param_scheduler`` for the run's wrapper. With an ``OptimWrapperDict`` (MMEngine's
    rules): a dict keyed by wrapper name gives each its own list; any other config is built
    for every wrapper. The schedulers of all wrappers form one list (checkpointed in order)."""
    from .optim_wrapper_dict import OptimWrapperDict
    if not isinstance(optim_wrapper, OptimWrapperDict):
        return build_param_schedulers(cfg, optim_wrapper.optimizer, epoch_length)
    if cfg is None:
        return []
    names = list(optim_wrapper.keys())
    if isinstance(cfg, dict) and 'type' not in cfg:
        unknown = [k for k in cfg if k not in names]
        if unknown:
            near = did_you_mean(str(unknown[0]), names)
            did = f' (did you mean {near!r}?)' if near else ''
            raise ConfigError(f'param_scheduler.{unknown[0]} is not an optimizer wrapper{did}: '
                              f'keyed by wrapper, param_scheduler takes the names {names}')
        per_name = cfg
    else:
        per_name = {name: cfg for name in names}
    built = []
    for name, one in per_name.items():
        for s in (one if isinstance(one, (list, tuple)) else [one]):
            if not isinstance(s, dict):
                raise ConfigError(f'param_scheduler for optim_wrapper.{name}: with several '
                                  f'optimizers give config dicts, not built schedulers ({s!r})')
        built += build_param_schedulers(one, optim_wrapper[name].optimizer, epoch_length)
    return built
