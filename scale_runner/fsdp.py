"""FSDP2 from ``accelerator.fsdp`` on any device.

Accelerate runs FSDP only on accelerator devices (GPU, XPU, ...): on the CPU (``MULTI_CPU``) it
drops the plugin without a word and wraps the model in DDP. Here the runner takes over there:
it keeps the plugin away from Accelerate, and at ``prepare`` shards the model over a gloo
device mesh with Accelerate's own FSDP2 preparation (``fsdp2_prepare_model``: the plugin's wrap
policy, mixed precision, ``reshard_after_forward``, activation checkpointing), then lets
Accelerate prepare the rest (the optimizer) without the model, so it is never put in DDP. With
one process there is nothing to shard: the model trains unsharded, and the log says so.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from .errors import ConfigError

# The attribute of an Accelerator holding the FSDP plugin the runner applies itself
# (Accelerate would not): kept on the object it belongs to, not in a module-level table.
PLUGIN_ATTR = 'scale_runner_fsdp_plugin'
MESH_DIM = 'dp_shard'  # Accelerate's name for the FSDP dimension of its device mesh


def check_cpu_plugin(plugin, fsdp_cfg: dict | None, kwargs: dict) -> None:
    """Refuse what FSDP2 on the CPU cannot honour (before the Accelerator is built)."""
    fsdp_cfg = dict(fsdp_cfg or {})

    def refuse(key: str, why: str) -> None:
        value = fsdp_cfg.get(key, getattr(plugin, key, None))
        raise ConfigError(f'accelerator.fsdp.{key} = {value!r} {why}')

    if plugin.fsdp_version != 2:
        refuse('fsdp_version', 'cannot run on the CPU: Accelerate runs FSDP1 only on GPUs, and '
                               'on the CPU scale_runner shards with FSDP2 (fully_shard). Set '
                               'accelerator.fsdp.fsdp_version=2 (the default) or train on GPUs.')
    from torch.distributed.fsdp import CPUOffloadPolicy
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
        refuse('cpu_offload', 'offloads parameters to the CPU, and this run is on the CPU '
                              'already: remove it (or set it to False).')
    if plugin.activation_checkpointing and plugin.auto_wrap_policy is None:
        refuse('activation_checkpointing', "checkpoints the layers the wrap policy picks, and "
                                           "there is none: set accelerator.fsdp.auto_wrap_policy "
                                           "('transformer_based_wrap' with "
                                           "transformer_cls_names_to_wrap, or 'size_based_wrap' "
                                           "with min_num_params).")
    if 'dynamo_plugin' in kwargs:
        raise ConfigError('accelerator.dynamo (or compile) with accelerator.fsdp is not supported '
                          'on the CPU yet: remove one of them, or train on GPUs.')


def keep_plugin(accelerator, plugin) -> None:
    """Record ``plugin`` as the runner's to apply (Accelerate did not take it)."""
    setattr(accelerator, PLUGIN_ATTR, plugin)


def prepare_sharded(accelerator, model, *extra, logger=None):
    """``accelerator.prepare(model, *extra)`` for a run with ``accelerator.fsdp``: the same
    return value, and one log line naming what became of the model. ``None`` when the run has
    no FSDP (the caller prepares as usual)."""
    plugin = getattr(accelerator, PLUGIN_ATTR, None)
    if plugin is None:
        if accelerator.distributed_type != 'FSDP':
            return None
        out = accelerator.prepare(model, *extra)  # Accelerate's own FSDP (GPUs)
        _log(logger, f'FSDP{accelerator.state.fsdp_plugin.fsdp_version} on '
                     f'{accelerator.device.type} ({accelerator.state.backend}, '
                     f'{accelerator.num_processes} processes): prepared by Accelerate'
                     f'{_units(out[0] if extra else out)}')
        return out
    if accelerator.num_processes == 1:
        _log(logger, 'accelerator.fsdp is set but this run has 1 process: nothing to shard, '
                     'training unsharded (launch 2+ processes for FSDP2)')
        return accelerator.prepare(model, *extra)
    if accelerator.device.type != 'cpu':  # XLA, say: Accelerate dropped it; our mesh is CPU's
        raise ConfigError(f'accelerator.fsdp: Accelerate does not run FSDP on '
                          f'{accelerator.distributed_type} ({accelerator.device}), and '
                          f'scale_runner shards itself only on the CPU: remove accelerator.fsdp '
                          f'or set accelerator.cpu=True')
    model = shard(accelerator, plugin, model, [o for o in extra if _is_optimizer(o)])
    _log(logger, f'FSDP2 on cpu ({accelerator.state.backend}, {accelerator.num_processes} '
                 f'processes): fully_shard applied by scale_runner{_units(model)}')
    if not extra:
        return model
    out = accelerator.prepare(*extra)  # without the model: Accelerate would put it in DDP
    return (model, *out) if isinstance(out, tuple) else (model, out)


def shard(accelerator, plugin, model, optimizers: list):
    """Shard ``model`` in place with Accelerate's FSDP2 preparation over a CPU mesh of every
    process, and point ``optimizers`` at the sharded parameters."""
    from accelerate.utils.fsdp_utils import (fsdp2_apply_ac, fsdp2_canonicalize_names,
                                             fsdp2_prepare_model)
    from torch.distributed.device_mesh import init_device_mesh
    if accelerator.mixed_precision != 'no':  # what AcceleratorState does with a plugin it keeps
        plugin.set_mixed_precision(accelerator.mixed_precision)
    mesh = init_device_mesh('cpu', (accelerator.num_processes,), mesh_dim_names=(MESH_DIM,))
    view = _AcceleratorView(accelerator, plugin, mesh)
    before = dict(model.named_parameters())
    plugin.set_auto_wrap_policy(model)  # as in Accelerate's _prepare_fsdp2, first
    if plugin.activation_checkpointing:
        model = fsdp2_apply_ac(view, model)
    model = fsdp2_prepare_model(view, model)
    after = fsdp2_canonicalize_names(dict(model.named_parameters()))
    missing = sorted(set(before) - set(after))
    if missing:
        raise RuntimeError(f'parameters missing after fully_shard: {missing}')
    # fully_shard replaces every parameter with a new (DTensor) one: an optimizer built over the
    # unsharded model would update tensors the model no longer uses.
    new = {before[name]: after[name] for name in before}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group['params'] = [new.get(p, p) for p in group['params']]
    return model


class _AcceleratorView:
    """The Accelerator as ``fsdp2_prepare_model`` / ``fsdp2_apply_ac`` read it: with the plugin
    Accelerate did not keep and the CPU mesh to shard over; the rest is the Accelerator's."""

    def __init__(self, accelerator, plugin, mesh):
        self._accelerator = accelerator
        self.state = SimpleNamespace(fsdp_plugin=plugin)
        self.torch_device_mesh = mesh
        self.parallelism_config = SimpleNamespace(fsdp_dim_names=[MESH_DIM])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._accelerator, name)


def _units(model) -> str:
    """' to N modules + root': the FSDP2 units (``fully_shard`` calls) under the root."""
    from torch.distributed.fsdp import FSDPModule
    if not isinstance(model, FSDPModule):  # FSDP1's wrapper: no units to count this way
        return ''
    n = sum(isinstance(m, FSDPModule) for m in model.modules()) - 1
    return f' to {n} modules + root'


def _is_optimizer(obj) -> bool:
    import torch
    return isinstance(obj, torch.optim.Optimizer)


def _log(logger, msg: str) -> None:
    if logger is not None:
        logger.info(msg)
