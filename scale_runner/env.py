"""Environment setup: the Accelerator from the ``accelerator`` config section, and seeds.

Precedence for every setting: a value in the config wins over the launcher's environment
(``accelerate launch --mixed_precision bf16`` sets ``ACCELERATE_MIXED_PRECISION``), which wins
over Accelerate's defaults. Unset config keys are simply not passed to ``Accelerator``.
"""
from __future__ import annotations

import datetime
import json
import os
import random
from pathlib import Path
from typing import Any

from .errors import ConfigError, closest

PASS_THROUGH = ('mixed_precision', 'cpu', 'device_placement', 'rng_types', 'project_dir',
                'step_scheduler_with_optimizer', 'dynamo_backend', 'kwargs_handlers')
DDP_KEYS = ('find_unused_parameters', 'broadcast_buffers', 'bucket_cap_mb', 'static_graph',
            'gradient_as_bucket_view', 'comm_hook')
OTHER_KEYS = ('dataloader_config', 'deepspeed', 'fsdp', 'dynamo', 'compile', 'timeout')
ACCELERATOR_KEYS = PASS_THROUGH + DDP_KEYS + OTHER_KEYS
RANDOMNESS_KEYS = ('seed', 'deterministic', 'diff_rank_seed')


def _check_keys(cfg: dict, valid: tuple, section: str) -> None:
    for key in cfg:
        if key == 'gradient_accumulation_steps' and section == 'accelerator':
            raise ConfigError('accelerator.gradient_accumulation_steps is not used: set '
                              'optim_wrapper.accumulative_counts (the one source of truth)')
        if key not in valid:
            near = closest(key, valid, n=1)
            hint = f' Did you mean {section}.{near[0]}?' if near else ''
            raise ConfigError(f'{section}.{key} = {cfg[key]!r} is not a supported setting.{hint} '
                              f'Supported: {", ".join(valid)}')


def accelerator_kwargs(cfg: dict, accumulative_counts: int = 1) -> dict:
    """Translate the ``accelerator`` config section into ``Accelerator(**kwargs)``."""
    cfg = dict(cfg or {})
    _check_keys(cfg, ACCELERATOR_KEYS, 'accelerator')
    kwargs = {k: cfg[k] for k in PASS_THROUGH if k in cfg}
    handlers = list(kwargs.pop('kwargs_handlers', []) or [])
    if isinstance(cfg.get('dataloader_config'), dict):
        from accelerate import DataLoaderConfiguration
        kwargs['dataloader_config'] = _build(DataLoaderConfiguration, cfg['dataloader_config'],
                                             'accelerator.dataloader_config')
    elif cfg.get('dataloader_config') is not None:
        kwargs['dataloader_config'] = cfg['dataloader_config']
    ddp = {k: cfg[k] for k in DDP_KEYS if k in cfg}
    if ddp:
        from accelerate.utils import DistributedDataParallelKwargs
        handlers.append(_build(DistributedDataParallelKwargs, ddp, 'accelerator'))
    if cfg.get('timeout') is not None:
        from accelerate.utils import InitProcessGroupKwargs
        handlers.append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=float(cfg['timeout']))))
    if handlers:
        kwargs['kwargs_handlers'] = handlers
    if cfg.get('fsdp') is not None:
        from accelerate.utils import FullyShardedDataParallelPlugin
        fsdp = dict(cfg['fsdp'])
        fsdp.setdefault('fsdp_version', 2)
        kwargs['fsdp_plugin'] = _build(FullyShardedDataParallelPlugin, fsdp, 'accelerator.fsdp')
    if cfg.get('deepspeed') is not None:
        kwargs['deepspeed_plugin'] = _deepspeed_plugin(cfg['deepspeed'], accumulative_counts)
    dynamo = cfg.get('dynamo', cfg.get('compile'))
    if dynamo:
        from accelerate.utils import TorchDynamoPlugin
        dynamo = {'backend': 'inductor'} if dynamo is True else (
            {'backend': dynamo} if isinstance(dynamo, str) else dict(dynamo))
        kwargs['dynamo_plugin'] = _build(TorchDynamoPlugin, dynamo, 'accelerator.dynamo')
    return kwargs


def _deepspeed_plugin(ds: Any, accumulative_counts: int):
    from accelerate.utils import DeepSpeedPlugin
    if isinstance(ds, (str, os.PathLike)):
        path = Path(ds)
        if not path.is_file():
            raise ConfigError(f'accelerator.deepspeed: no DeepSpeed config file at {path}')
        ds = json.loads(path.read_text())
    ds = dict(ds)
    steps = ds.get('gradient_accumulation_steps', 'auto')
    if steps not in ('auto', accumulative_counts):
        raise ConfigError(f'accelerator.deepspeed.gradient_accumulation_steps={steps} disagrees with '
                          f'optim_wrapper.accumulative_counts={accumulative_counts}: remove it from '
                          f'the DeepSpeed config (accumulative_counts is the one source of truth)')
    ds['gradient_accumulation_steps'] = accumulative_counts
    return DeepSpeedPlugin(hf_ds_config=ds, gradient_accumulation_steps=accumulative_counts)


def _build(cls, kwargs: dict, where: str):
    from .registry import call_with_cfg
    return call_with_cfg(cls, dict(kwargs), where)


def build_accelerator(cfg: Any, accumulative_counts: int = 1):
    """An ``Accelerator`` for this run.

    Guards the duplicate-training trap: several launched processes that Accelerate would
    each see as a world of one (plain ``torchrun`` on a machine with no GPU).
    """
    from accelerate import Accelerator
    if isinstance(cfg, Accelerator):
        return cfg
    kwargs = accelerator_kwargs(cfg, accumulative_counts)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and 'cpu' not in kwargs and not os.environ.get('ACCELERATE_USE_CPU'):
        import torch
        if not torch.cuda.is_available():
            kwargs['cpu'] = True  # several processes, no GPU: gloo on the CPU, not N lone ranks
    accelerator = Accelerator(**kwargs)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f'WORLD_SIZE={world} but Accelerate sees a single process: every rank would train '
            f'alone as rank 0 and write the same files. Launch with '
            f'`accelerate launch --multi_gpu --num_processes {world} -m scale_runner train CFG` '
            f'(on a CPU-only machine prefix ACCELERATE_USE_CPU=1).')
    return accelerator


def set_randomness(accelerator, seed: int | None = None, deterministic: bool = False,
                   diff_rank_seed: bool = False) -> int:
    """Seed python/numpy/torch identically on every rank (or per rank); return the seed."""
    from accelerate.utils import broadcast_object_list, set_seed
    if seed is None:
        seed = [random.randrange(2**31)]
        if accelerator.num_processes > 1:
            broadcast_object_list(seed)
        seed = seed[0]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f'randomness.seed must be an int or None, got {seed!r}')
    set_seed(seed, device_specific=diff_rank_seed, deterministic=deterministic)
    return seed


def check_randomness(cfg: Any) -> dict:
    cfg = dict(cfg or {})
    _check_keys(cfg, RANDOMNESS_KEYS, 'randomness')
    return cfg
