"""Optimizer wrapper constructors: MMEngine's ``constructor=`` and ``paramwise_cfg``.

``DefaultOptimWrapperConstructor(optim_wrapper_cfg, paramwise_cfg=None)(model)`` builds one
``OptimWrapper``; with ``paramwise_cfg`` the parameters get their own lr / weight decay:

- ``custom_keys={'backbone': dict(lr_mult=0.1, decay_mult=1.0), ...}``: a parameter whose full
  name (``backbone.conv1.weight``) contains a key gets ``lr * lr_mult`` and
  ``weight_decay * decay_mult``; the longest matching key wins (then alphabetical order);
- otherwise ``bias_lr_mult`` (biases outside norm layers), ``bias_decay_mult``,
  ``norm_decay_mult`` (every parameter of a BatchNorm / GroupNorm / LayerNorm / InstanceNorm),
  ``dwconv_decay_mult`` (depth-wise convolutions) and ``flat_decay_mult`` (other 1-d
  parameters), checked in that order, as MMEngine does.

Parameters with equal options share one ``param_group`` (MMEngine makes one group per
parameter; the optimizer does the same with fewer groups). A parameter shared by two modules is
listed once. ``MultiOptimWrapperConstructor`` builds an :class:`OptimWrapperDict` with one
wrapper per top-level sub-module named in the config. A custom constructor subclasses one of
these and is registered in ``OPTIM_WRAPPER_CONSTRUCTORS``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .checks import check_number, check_optimizer_args
from .errors import ConfigError, check_keys, closest
from .registry import OPTIM_WRAPPER_CONSTRUCTORS, OPTIM_WRAPPERS, OPTIMIZERS

PARAMWISE_KEYS = ('custom_keys', 'bias_lr_mult', 'bias_decay_mult', 'norm_decay_mult',
                  'dwconv_decay_mult', 'flat_decay_mult', 'bypass_duplicate')
CUSTOM_KEY_KEYS = ('lr_mult', 'decay_mult')
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def check_paramwise_cfg(cfg: Any, where: str) -> dict:
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where} = {cfg!r} is not valid: it takes a dict, e.g. "
                          f"dict(norm_decay_mult=0.0, custom_keys={{'backbone': dict(lr_mult=0.1)}})")
    check_keys(cfg, PARAMWISE_KEYS, where, 'a paramwise_cfg')
    for key, value in cfg.items():
        if key.endswith('_mult'):
            check_number(value, f'{where}.{key}', low=0, example=f'{key}=0.0')
    custom = cfg.get('custom_keys') or {}
    if not isinstance(custom, dict):
        raise ConfigError(f"{where}.custom_keys = {custom!r} is not valid: it takes "
                          f"{{'name part': dict(lr_mult=..., decay_mult=...)}}")
    for name, opts in custom.items():
        at = f'{where}.custom_keys[{name!r}]'
        if not isinstance(name, str) or not name:
            raise ConfigError(f'{where}.custom_keys: the key {name!r} must be a non-empty string '
                              f'(a part of parameter names)')
        if not isinstance(opts, dict):
            raise ConfigError(f'{at} = {opts!r} is not valid: it takes dict(lr_mult=..., '
                              f'decay_mult=...)')
        check_keys(opts, CUSTOM_KEY_KEYS, at, 'a custom_keys entry')
        for key, value in opts.items():
            check_number(value, f'{at}.{key}', low=0, example=f'{key}=0.1')
    return dict(cfg)


def paramwise_groups(model: nn.Module, cfg: dict, base_lr: float | None, base_wd: float | None,
                     where: str) -> list[dict]:
    """The optimizer's ``param_groups`` for ``model`` under ``paramwise_cfg`` ``cfg``."""
    custom = cfg.get('custom_keys') or {}
    keys = sorted(sorted(custom), key=len, reverse=True)  # longest first, then alphabetical
    if base_lr is None and (cfg.get('bias_lr_mult') is not None
                            or any('lr_mult' in v for v in custom.values())):
        raise ConfigError(f'{where}: lr_mult needs optim_wrapper.optimizer.lr to be set')
    used = set()
    groups: dict[tuple, dict] = {}

    def add(options: dict, param) -> None:
        key = tuple(sorted(options.items()))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {'params': [], **options}
        group['params'].append(param)

    for prefix, module in model.named_modules():
        is_norm = isinstance(module, NORMS)
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups > 1
        for name, param in module.named_parameters(recurse=False):
            if id(param) in used:
                continue  # shared (tied) parameter: listed once, as model.parameters() does
            used.add(id(param))
            full = f'{prefix}.{name}' if prefix else name
            options: dict = {}
            if not param.requires_grad:
                add(options, param)
                continue
            match = next((k for k in keys if k in full), None)
            if match is not None:
                if 'lr_mult' in custom[match]:
                    options['lr'] = base_lr * custom[match]['lr_mult']
                if base_wd is not None and 'decay_mult' in custom[match]:
                    options['weight_decay'] = base_wd * custom[match]['decay_mult']
                add(options, param)
                continue
            if name == 'bias' and not is_norm and cfg.get('bias_lr_mult') is not None:
                options['lr'] = base_lr * cfg['bias_lr_mult']
            if base_wd is not None:
                mult = None
                if is_norm and cfg.get('norm_decay_mult') is not None:
                    mult = cfg['norm_decay_mult']
                elif name == 'bias' and cfg.get('bias_decay_mult') is not None:
                    mult = cfg['bias_decay_mult']
                elif is_dwconv and cfg.get('dwconv_decay_mult') is not None:
                    mult = cfg['dwconv_decay_mult']
                elif param.ndim == 1 and cfg.get('flat_decay_mult') is not None:
                    mult = cfg['flat_decay_mult']
                if mult is not None:
                    options['weight_decay'] = base_wd * mult
            add(options, param)
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    for name in custom:
        if not any(name in n for n in names):  # a key that matches nothing is a typo
            near = closest(name, names, n=3)
            hint = f' (parameters like: {", ".join(near or names[:3])})' if names else ''
            raise ConfigError(f'{where}.custom_keys[{name!r}] matches no parameter name of the '
                              f'model{hint}')
    return list(groups.values())


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class DefaultOptimWrapperConstructor:
    """Builds ``optim_wrapper_cfg`` (``optimizer=``, ``type=``, ``clip_grad=``, ...) for a
    model, with ``paramwise_cfg`` (see the module docstring)."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        if not isinstance(optim_wrapper_cfg, dict):
            raise ConfigError(f'optim_wrapper = {optim_wrapper_cfg!r} is not valid: it takes a dict')
        self.optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.where = self.optim_wrapper_cfg.pop('_where', 'optim_wrapper')
        self.paramwise_cfg = check_paramwise_cfg(paramwise_cfg, f'{self.where}.paramwise_cfg')

    def __call__(self, model: nn.Module):
        cfg = dict(self.optim_wrapper_cfg)
        cfg.setdefault('type', 'OptimWrapper')
        where = self.where
        optimizer = cfg.get('optimizer')
        if optimizer is None:
            raise ConfigError(f"{where}.optimizer is missing: e.g. {where}=dict(optimizer=dict("
                              f"type='AdamW', lr=1e-3))")
        if isinstance(optimizer, dict):
            optimizer = dict(optimizer)
            params: Any = model.parameters()
            if self.paramwise_cfg:
                params = paramwise_groups(model, self.paramwise_cfg, optimizer.get('lr'),
                                          optimizer.get('weight_decay'), f'{where}.paramwise_cfg')
            cfg['optimizer'] = OPTIMIZERS.build(optimizer, _cfg_path=f'{where}.optimizer',
                                                _check=check_optimizer_args, _wrap_errors=True,
                                                params=params)
        elif self.paramwise_cfg:
            raise ConfigError(f'{where}.paramwise_cfg needs {where}.optimizer as a config dict: a '
                              f'built optimizer already has its parameter groups')
        elif not isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, 'step'):
            raise ConfigError(f'{where}.optimizer = {optimizer!r} is not valid: it takes '
                              f"dict(type='AdamW', lr=1e-3, ...) or a built torch optimizer")
        return OPTIM_WRAPPERS.build(cfg, _cfg_path=where)


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class MultiOptimWrapperConstructor:
    """``optim_wrapper=dict(generator=dict(optimizer=...), discriminator=dict(...))``: one
    wrapper per sub-module ``model.<name>``, as an :class:`OptimWrapperDict`. ``paramwise_cfg``
    is a dict of each name's ``paramwise_cfg`` (or set it inside each entry)."""

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: dict | None = None):
        if not isinstance(optim_wrapper_cfg, dict) or not optim_wrapper_cfg:
            raise ConfigError(f'optim_wrapper = {optim_wrapper_cfg!r} is not valid for several '
                              f'optimizers: it takes dict(<sub-module name>=dict(optimizer=...), ...)')
        self.optim_wrapper_cfg = dict(optim_wrapper_cfg)
        self.paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(self.paramwise_cfg) - set(self.optim_wrapper_cfg)
        if unknown:
            raise ConfigError(f'optim_wrapper.paramwise_cfg has {sorted(unknown)}, which are not '
                              f'optimizer wrappers ({sorted(self.optim_wrapper_cfg)}): key it by '
                              f'wrapper name')

    def __call__(self, model: nn.Module):
        from .model import unwrap
        from .optim import OptimWrapper
        from .optim_wrapper_dict import OptimWrapperDict
        core = unwrap(model)
        children = dict(core.named_children())
        wrappers = {}
        for name, cfg in self.optim_wrapper_cfg.items():
            where = f'optim_wrapper.{name}'
            if isinstance(cfg, OptimWrapper):
                wrappers[name] = cfg
                continue
            if name not in children:
                near = closest(str(name), children, n=1)
                did = f' Did you mean {near[0]!r}?' if near else ''
                raise ConfigError(f'{where}: the model has no sub-module {name!r} to optimize (its '
                                  f'sub-modules: {list(children)}).{did} With several optimizers '
                                  f'each key of optim_wrapper names a sub-module')
            if not isinstance(cfg, dict):
                raise ConfigError(f"{where} = {cfg!r} is not valid: it takes dict(optimizer=dict("
                                  f"type='Adam', lr=...)) or an OptimWrapper")
            cfg = dict(cfg)
            paramwise = cfg.pop('paramwise_cfg', None) or self.paramwise_cfg.get(name)
            constructor = cfg.pop('constructor', 'DefaultOptimWrapperConstructor')
            cls = _constructor_class(constructor, f'{where}.constructor')
            wrappers[name] = cls(dict(cfg, _where=where), paramwise)(children[name])
        return OptimWrapperDict(**wrappers)


def _constructor_class(constructor: Any, where: str):
    try:
        cls = OPTIM_WRAPPER_CONSTRUCTORS.get(constructor)
    except KeyError as e:
        raise ConfigError(f'{where}: {e.args[0] if e.args else e}') from None
    if not callable(cls):
        raise ConfigError(f'{where} = {constructor!r} is not a constructor class')
    return cls


def build_with_constructor(constructor: Any, cfg: dict, model: nn.Module):
    """``optim_wrapper`` built by ``constructor`` (a registered name or class)."""
    cls = _constructor_class(constructor, 'optim_wrapper.constructor')
    cfg = dict(cfg)
    paramwise = cfg.pop('paramwise_cfg', None)
    try:
        return cls(cfg, paramwise)(model)
    except TypeError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f'optim_wrapper.constructor {getattr(cls, "__name__", cls)}: {e} (a '
                          f'constructor is called as Constructor(optim_wrapper_cfg, '
                          f'paramwise_cfg)(model))') from e
