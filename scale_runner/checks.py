"""Checks of the values the runner hands to torch: dataloader, optimizer and scheduler arguments.

A wrong value is a :class:`ConfigError` naming the key path, the value and what is valid,
raised before torch sees it (torch fails later, or with a message that names neither the key
nor the config: ``'<' not supported between instances of 'str' and 'float'``).

Only torch's own classes are checked against their signatures' defaults (a parameter whose
default is a number takes a number, ...): a user's class may accept anything it documents.
"""
from __future__ import annotations

import inspect
import math
import numbers
import sys
from typing import Any, Callable

from .errors import ConfigError

_BOOL_WORDS = {'true', 'false', 'yes', 'no', 'on', 'off', 'y', 'n'}


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get('torch')
    return torch is not None and isinstance(value, torch.Tensor)


def bad_value(where: str, value: Any, valid: str, example: str | None = None) -> ConfigError:
    """``where = value is not valid: it takes <valid> (e.g. <example>)``, with a hint for a
    quoted number or a quoted boolean."""
    hint = ''
    if isinstance(value, str):
        text = value.strip()
        try:
            float(text)
            hint = f' (this is the string {value!r}: write the number without quotes)'
        except ValueError:
            if text.lower() in _BOOL_WORDS:
                hint = f' (this is the string {value!r}: write True or False, without quotes)'
    eg = f', e.g. {example}' if example else ''
    return ConfigError(f'{where} = {value!r} is not valid: it takes {valid}{eg}{hint}')


def _range(low=None, high=None, low_open=False, high_open=False) -> str:
    if low is not None and high is not None:
        return f' in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
    if low is not None:
        return f' {">" if low_open else ">="} {low}'
    if high is not None:
        return f' {"<" if high_open else "<="} {high}'
    return ''


def _in_range(v, low, high, low_open, high_open) -> bool:
    if isinstance(v, float) and math.isnan(v):
        return False
    if low is not None and (v <= low if low_open else v < low):
        return False
    if high is not None and (v >= high if high_open else v > high):
        return False
    return True


def check_int(value: Any, where: str, *, low: int | None = None, allow_none: bool = False,
              example: str | None = None) -> None:
    if value is None and allow_none:
        return
    if is_int(value) and _in_range(value, low, None, False, False):
        return
    valid = f'an int{_range(low)}' + (' or None' if allow_none else '')
    raise bad_value(where, value, valid, example)


def check_number(value: Any, where: str, *, low=None, high=None, low_open: bool = False,
                 high_open: bool = False, allow_none: bool = False, allow_tensor: bool = False,
                 example: str | None = None) -> None:
    if value is None and allow_none:
        return
    if allow_tensor and _is_tensor(value):
        return
    if is_number(value) and _in_range(value, low, high, low_open, high_open):
        return
    valid = f'a number{_range(low, high, low_open, high_open)}' + (' or None' if allow_none else '')
    raise bad_value(where, value, valid, example)


def check_bool(value: Any, where: str, *, allow_none: bool = False) -> None:
    if isinstance(value, bool) or (value is None and allow_none):
        return
    raise bad_value(where, value, 'True or False' + (' (or None)' if allow_none else ''))


def check_against_defaults(obj: Callable, kwargs: dict, where: str, skip=()) -> None:
    """For a torch class: a parameter whose default is a bool takes a bool (or 0/1/None), one
    whose default is a number takes a number (a tensor, or one per parameter group), one whose
    default is a tuple of numbers takes as many numbers."""
    module = getattr(obj, '__module__', None) or ''
    if not (module == 'torch' or module.startswith('torch.')):
        return
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return
    for key, value in kwargs.items():
        p = params.get(key)
        if key in skip or p is None or p.default is p.empty or p.default is None:
            continue
        default, path = p.default, f'{where}.{key}'
        if isinstance(default, bool):
            if not (isinstance(value, bool) or value is None or (is_int(value) and value in (0, 1))):
                raise bad_value(path, value, 'True or False')
        elif is_number(default):
            if _number_like(value) or (isinstance(value, (list, tuple)) and value
                                       and all(_number_like(v) for v in value)):
                continue
            raise bad_value(path, value, 'a number', f'{key}={default!r}')
        elif isinstance(default, tuple) and default and all(d is None or is_number(d) for d in default):
            if (isinstance(value, (list, tuple)) and len(value) == len(default)
                    and all(_number_like(v) or (v is None and d is None) for v, d in zip(value, default))):
                continue
            raise bad_value(path, value, f'{len(default)} numbers', f'{key}={default!r}')


def _number_like(v: Any) -> bool:
    return is_number(v) or _is_tensor(v)


# ---- optimizers ---------------------------------------------------------------------------------
_NON_NEGATIVE = ('momentum', 'weight_decay', 'eps', 'lr_decay', 'alpha', 'initial_accumulator_value')


def check_optimizer_args(obj: Callable, kwargs: dict, where: str) -> None:
    """``optim_wrapper.optimizer``: torch optimizers' ranges (lr >= 0, betas in [0, 1), ...)."""
    module = getattr(obj, '__module__', None) or ''
    if not module.startswith('torch.'):
        return
    if 'lr' in kwargs:
        check_number(kwargs['lr'], f'{where}.lr', low=0, allow_tensor=True, example='lr=1e-3')
    check_against_defaults(obj, kwargs, where)
    for key in _NON_NEGATIVE:
        if key in kwargs and is_number(kwargs[key]):
            check_number(kwargs[key], f'{where}.{key}', low=0)
    betas = kwargs.get('betas')
    if isinstance(betas, (list, tuple)):
        for b in betas:
            if is_number(b) and not 0 <= b < 1:
                raise bad_value(f'{where}.betas', betas, 'numbers in [0, 1)', 'betas=(0.9, 0.999)')
    if 'rho' in kwargs and is_number(kwargs['rho']):
        check_number(kwargs['rho'], f'{where}.rho', low=0, high=1)


# ---- parameter schedulers -----------------------------------------------------------------------
_FACTORS = {('LinearLR', 'start_factor'): dict(low=0, high=1, low_open=True),
            ('LinearLR', 'end_factor'): dict(low=0, high=1),
            ('ConstantLR', 'factor'): dict(low=0, high=1)}


def check_scheduler_args(obj: Callable, kwargs: dict, where: str) -> None:
    """A ``param_scheduler`` entry's constructor arguments (torch schedulers)."""
    module = getattr(obj, '__module__', None) or ''
    if not module.startswith('torch.'):
        return
    from .schedulers import LENGTH_PARAMS, MILESTONE_PARAMS
    check_against_defaults(obj, kwargs, where)
    name = getattr(obj, '__name__', '')
    for key in LENGTH_PARAMS:
        if key in kwargs:
            if key in ('T_0', 'step_size'):
                check_int(kwargs[key], f'{where}.{key}', low=1)
            else:
                check_number(kwargs[key], f'{where}.{key}', low=0, low_open=True)
    for key in MILESTONE_PARAMS:
        if key in kwargs:
            v = kwargs[key]
            if not (isinstance(v, (list, tuple)) and all(is_number(m) for m in v)):
                raise bad_value(f'{where}.{key}', v, 'a list of step numbers', f'{key}=[30, 60]')
    for (cls_name, key), rng in _FACTORS.items():
        if name == cls_name and key in kwargs:
            check_number(kwargs[key], f'{where}.{key}', **rng)


# ---- dataloaders --------------------------------------------------------------------------------
def check_dataloader_args(cfg: dict, where: str, has_sampler: bool = True) -> None:
    """The ``DataLoader`` arguments of a ``*_dataloader`` section (not dataset/sampler/collate_fn)."""
    if 'batch_size' in cfg:
        check_int(cfg['batch_size'], f'{where}.batch_size', low=1, allow_none=True,
                  example='batch_size=32')
    if 'num_workers' in cfg:
        check_int(cfg['num_workers'], f'{where}.num_workers', low=0,
                  example='num_workers=2 (0: load in the main process)')
    if has_sampler and cfg.get('shuffle') not in (None, False):
        raise ConfigError(f'{where}.shuffle = {cfg["shuffle"]!r} is not valid here: the runner '
                          f'always gives the dataloader a sampler (it makes the order resumable); '
                          f"shuffle with {where}.sampler=dict(type='DefaultSampler', shuffle=True)")
    for key in ('drop_last', 'pin_memory', 'persistent_workers'):
        if key in cfg:
            check_bool(cfg[key], f'{where}.{key}')
    if 'timeout' in cfg:
        check_number(cfg['timeout'], f'{where}.timeout', low=0)
    if cfg.get('prefetch_factor') is not None:
        check_int(cfg['prefetch_factor'], f'{where}.prefetch_factor', low=1, allow_none=True)
        if not cfg.get('num_workers'):
            raise ConfigError(f'{where}.prefetch_factor = {cfg["prefetch_factor"]!r} needs '
                              f'{where}.num_workers > 0 (workers prefetch; with none, remove it)')


def check_sampler_args(cfg: dict, where: str) -> None:
    """The common sampler keys (``DefaultSampler``, ``InfiniteSampler`` and look-alikes)."""
    if 'shuffle' in cfg:
        check_bool(cfg['shuffle'], f'{where}.shuffle')
    if 'round_up' in cfg:
        check_bool(cfg['round_up'], f'{where}.round_up')
    if cfg.get('seed') is not None:
        check_int(cfg['seed'], f'{where}.seed', allow_none=True)
