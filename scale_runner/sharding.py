"""Full (gathered) state of FSDP2-sharded models and their optimizers, for checkpoints.

FSDP2 (``fully_shard``, Accelerate's ``fsdp_version: 2``) turns parameters and optimizer moments
into ``DTensor`` shards, which have no storage of their own to write. A checkpoint holds full
tensors instead (loadable at any world size, and without torch.distributed), so saving gathers
them and loading scatters them back, with ``torch.distributed.checkpoint``'s state-dict helpers.
Every function here is collective: every rank calls it.
"""
from __future__ import annotations

import sys

import torch


def is_sharded(module: torch.nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ``DTensor`` (FSDP2, tensor parallelism)."""
    # No DTensor exists before its module is imported (FSDP2 imports it): checking for it this
    # way spares every other run the 0.8 s import.
    tensor_module = sys.modules.get('torch.distributed.tensor')
    if tensor_module is None:
        return False
    return any(isinstance(p, tensor_module.DTensor) for p in module.parameters())


def _full(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kwargs)


def full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's full state, keyed by parameter names, on the CPU; ``{}`` on ranks other
    than 0 (only rank 0 writes it)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    return get_optimizer_state_dict(module, optimizer, options=_full(cpu_offload=True))


def load_full_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                              state: dict) -> None:
    """Shard a state from :func:`full_optimizer_state` (every rank holds it) into ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    set_optimizer_state_dict(module, optimizer, state, options=_full())


def load_full_model_state(module: torch.nn.Module, weights: dict) -> None:
    """Shard full ``weights`` (a subset of the module's keys) into ``module``'s parameters."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(module, weights, options=_full(strict=False))
