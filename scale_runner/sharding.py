"""State of FSDP2-sharded models and their optimizers (``DTensor``s), for checkpoints.

FSDP2 (``fully_shard``, Accelerate's ``fsdp_version: 2``) turns parameters and optimizer moments
into ``DTensor`` shards. A checkpoint keeps them sharded (each rank writes its own shards,
``checkpoint/sharded.py``); a checkpoint of whole tensors (written unsharded) is scattered into
them. These helpers use ``torch.distributed.checkpoint``'s state-dict functions and take either
kind; every function here is collective: every rank calls it.
"""
from __future__ import annotations

import torch

from .checkpoint.sharded import is_dtensor


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2, tensor parallelism)."""
    # No DTensor exists before its module is imported (FSDP2 imports it): checking for it this
    # way spares every other run the 0.8 s import.
    return any(is_dtensor(p) for p in module.parameters())


def _options(state: dict, **kwargs):
    """Full-state options unless the state's tensors are shards already."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    from .checkpoint.format import sharded_tensors
    return StateDictOptions(full_state_dict=not sharded_tensors(state), **kwargs)


def optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter names, its moments as this rank's shards."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer)


def load_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict) -> None:
    """Load a state of :func:`optimizer_state` (shards) or of whole tensors into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, state, options=_options(state))


def load_model_state(module: torch.nn.Module, weights: dict) -> None:
    """Load ``weights`` (a subset of the module's keys; shards or whole tensors) into
    ``module``'s ``DTensor`` parameters."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(module, weights, options=_options(weights, strict=False))


def shard_like(src: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor ``src`` as a ``DTensor`` placed like ``like``: each rank keeps its own
    shard of it (every rank holds ``src``: no communication)."""
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(src.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` where either may be a ``DTensor``: a whole ``src`` gives a sharded
    ``dst`` its own shard, a sharded ``src`` is put together for a whole ``dst``."""
    if is_dtensor(dst) and not is_dtensor(src):
        src = shard_like(src, dst)
    elif is_dtensor(src) and not is_dtensor(dst):
        src = src.full_tensor()
    dst.copy_(src)
