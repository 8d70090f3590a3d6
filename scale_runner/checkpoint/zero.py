"""DeepSpeed ZeRO state, pickle-free: each rank's optimizer partition and the full fp32 weights.

A ZeRO optimizer's ``state_dict()`` is tensors (the rank's fp32 partition, its Adam moments)
plus a few Python objects: the loss scaler, the stage enum, slice addresses, tuples. DeepSpeed
saves it with ``torch.save`` (a pickle). Here it becomes tagged JSON + tensors: each object of a
short allow-list is stored as its class name and attributes and rebuilt without running its
constructor; anything else is refused when saving. Every rank writes its own partition
(``zero_<rank>.safetensors`` / ``.json``); resume needs the same number of processes.
"""
from __future__ import annotations

import enum
from typing import Any

import torch

from .format import CheckpointError

ENGINE_COUNTERS = ('global_steps', 'global_samples', 'micro_steps', 'skipped_steps')


def _allowed() -> dict[str, type]:
    """The classes a ZeRO state may hold, by name (DeepSpeed imported only here)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return {c.__name__: c for c in (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address)}


def is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type == 'DEEPSPEED'


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


# ---- the codec ---------------------------------------------------------------------------------
def encode(obj: Any, allowed: dict[str, type], path: str = 'zero') -> Any:
    """``obj`` as JSON values and tensors (copied: the live ones change at the next step)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, enum.Enum):
        _check(type(obj), allowed, path)
        return {'__enum__': type(obj).__name__, 'value': obj.value}
    if isinstance(obj, torch.dtype):
        return {'__dtype__': str(obj).removeprefix('torch.')}
    if isinstance(obj, dict):
        return {k: encode(v, allowed, f'{path}.{k}') for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {'__tuple__': [encode(v, allowed, f'{path}.{i}') for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, allowed, f'{path}.{i}') for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    _check(type(obj), allowed, path)
    return {'__object__': type(obj).__name__, 'attrs': encode(vars(obj), allowed, f'{path}.attrs')}


def decode(obj: Any, allowed: dict[str, type], path: str = 'zero') -> Any:
    """Inverse of :func:`encode`; only classes of ``allowed`` are rebuilt, and without calling
    their constructors (their attributes are set)."""
    if isinstance(obj, list):
        return [decode(v, allowed, f'{path}.{i}') for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if set(obj) == {'__tuple__'}:
        return tuple(decode(v, allowed, path) for v in obj['__tuple__'])
    if set(obj) == {'__dtype__'}:
        dtype = getattr(torch, str(obj['__dtype__']), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f'{path}: {obj["__dtype__"]!r} is not a torch dtype')
        return dtype
    if set(obj) == {'__enum__', 'value'}:
        return _class(obj['__enum__'], allowed, path)(obj['value'])
    if set(obj) == {'__object__', 'attrs'}:
        cls = _class(obj['__object__'], allowed, path)
        instance = cls.__new__(cls)
        instance.__dict__.update(decode(obj['attrs'], allowed, f'{path}.attrs'))
        return instance
    return {k: decode(v, allowed, f'{path}.{k}') for k, v in obj.items()}


def _check(cls: type, allowed: dict[str, type], path: str) -> None:
    if allowed.get(cls.__name__) is not cls:
        raise CheckpointError(f'cannot store {cls.__module__}.{cls.__name__} at checkpoint key '
                              f'{path!r}: not one of the DeepSpeed classes a ZeRO state may hold '
                              f'({", ".join(sorted(allowed))})')


def _class(name: Any, allowed: dict[str, type], path: str) -> type:
    if name not in allowed:
        raise CheckpointError(f'{path}: class {name!r} is not one a ZeRO state may hold '
                              f'({", ".join(sorted(allowed))}); the checkpoint is refused')
    return allowed[name]


# ---- the engine --------------------------------------------------------------------------------
def zero_state(engine) -> dict:
    """This rank's ZeRO optimizer partition and the engine's step counters (every rank)."""
    allowed = _allowed()
    return {'optimizer': encode(engine.optimizer.state_dict(), allowed),
            'engine': {k: int(getattr(engine, k)) for k in ENGINE_COUNTERS},
            'stage': zero_stage(engine)}


def load_zero_state(engine, saved: dict, rank: int, world_size: int, path: str) -> None:
    """Restore this rank's partition (``load_from_fp32_weights``: the fp32 master copy, not one
    rebuilt from the bf16/fp16 weights) and the counters. ZeRO-3 rebuilds the rank's weight
    partition from it too. Collective (ZeRO-1/2 all-gather the updated weights)."""
    if saved.get('stage') != zero_stage(engine):
        raise CheckpointError(f'{path} was saved with DeepSpeed ZeRO stage {saved.get("stage")}, '
                              f'this run uses stage {zero_stage(engine)}: resume needs the same '
                              f'stage; use load_from={path!r} to start a new run from its weights')
    partitions: list = [None] * world_size
    partitions[rank] = decode(saved['optimizer'], _allowed())
    engine.optimizer.load_state_dict(partitions, load_optimizer_states=True,
                                     load_from_fp32_weights=True)
    for key, value in saved.get('engine', {}).items():
        if key in ENGINE_COUNTERS:
            setattr(engine, key, int(value))


def full_weights(engine) -> dict[str, torch.Tensor]:
    """The model's weights as whole fp32 tensors (the master copy, put together from every
    rank's partition) and its buffers, keyed like ``module.state_dict()``. Collective: every
    rank gathers each parameter in the same order; only the main process keeps them."""
    from deepspeed.utils import safe_get_full_fp32_param
    module = engine.module
    params = dict(module.named_parameters(remove_duplicate=False))
    main = engine.global_rank == 0
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict().items():
        p = params.get(name)
        full = safe_get_full_fp32_param(p) if p is not None else None
        if full is None and p is not None and hasattr(p, 'ds_id'):  # a frozen ZeRO-3 parameter
            import deepspeed
            with deepspeed.zero.GatheredParameters([p]):
                full = p.detach().clone()
        if main:
            out[name] = (full if full is not None else value).detach().cpu().clone()
    return out


# ---- resume ------------------------------------------------------------------------------------
def check_zero_resume(runner, meta: dict, rank_state: dict, path: str, change: str | None) -> None:
    """Refuse, before anything is loaded, a resume that cannot continue the ZeRO state exactly."""
    if runner.optim_wrapper is None:
        return
    saved, now = meta.get('zero_stage'), is_deepspeed(runner.accelerator)
    fresh = f'; use load_from={path!r} to start a new run from its (full fp32) weights'
    if now and saved is None:
        raise CheckpointError(f'{path} was not saved under DeepSpeed: its optimizer state is not a '
                              f'ZeRO partition, so this DeepSpeed run cannot resume from it{fresh}')
    if saved is None:
        return
    if not now:
        raise CheckpointError(f'{path} was saved under DeepSpeed ZeRO-{saved}: its optimizer state '
                              f'is in per-rank ZeRO partitions; resume it under DeepSpeed with the '
                              f'same stage and number of processes{fresh}')
    if change:
        raise CheckpointError(f'{path}: resuming a DeepSpeed ZeRO-{saved} run with a different '
                              f'setup ({change}) is not supported: each rank\'s ZeRO partition '
                              f'is laid out for the saved number of processes, so resume with '
                              f'{meta.get("world_size")} processes and the same batch size{fresh}')
    if meta.get('zero_inside_window'):
        raise CheckpointError(f'{path} was saved inside a gradient-accumulation window: '
                              f'DeepSpeed keeps the window\'s partial gradients in its own '
                              f'buckets, which are not saved; resume from a checkpoint at a '
                              f'window boundary (an iteration divisible by '
                              f'optim_wrapper.accumulative_counts){fresh}')
    if 'zero' not in rank_state:
        raise CheckpointError(f'{path} holds no ZeRO optimizer partition for rank '
                              f'{runner.accelerator.process_index}{fresh}')


def load_zero_weights(engine, weights: dict, path: str) -> None:
    """The saved full weights into a DeepSpeed engine's module. ZeRO-3's parameters are
    partitions that the optimizer state rebuilds (:func:`load_zero_state`): only the buffers
    are loaded, after the parameter names and shapes are checked."""
    from .state import load_weights
    module = engine.module
    if zero_stage(engine) < 3:
        load_weights(module, weights, path)
        return
    params = dict(module.named_parameters(remove_duplicate=False))
    names = set(module.state_dict())
    bad = sorted(names ^ set(weights))
    bad += [f'{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(p.ds_shape)}'
            for k, p in params.items() if k in weights and tuple(weights[k].shape) != tuple(p.ds_shape)]
    if bad:
        raise CheckpointError(f'cannot resume from {path}: its weights do not fit the model '
                              f'(missing, unexpected or differently shaped): {"; ".join(bad)}')
    module.load_state_dict({k: v for k, v in weights.items() if k not in params}, strict=False)
