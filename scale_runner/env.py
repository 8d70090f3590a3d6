"""Environment setup: the Accelerator from the ``accelerator`` config section, and seeds."""
from __future__ import annotations

import os
import random
from typing import Any

from .errors import ConfigError, closest

ACCELERATOR_KEYS = ('mixed_precision', 'cpu', 'dataloader_config', 'kwargs_handlers',
                    'dynamo_backend', 'project_dir', 'step_scheduler_with_optimizer',
                    'device_placement', 'rng_types')
RANDOMNESS_KEYS = ('seed', 'deterministic', 'diff_rank_seed')


def build_accelerator(cfg: Any):
    """``Accelerator(**cfg)``; ``dataloader_config`` may be a dict.

    Guards the duplicate-training trap: several launched processes that Accelerate would
    each see as a world of one (plain ``torchrun`` on a machine with no GPU).
    """
    from accelerate import Accelerator
    if isinstance(cfg, Accelerator):
        return cfg
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in ACCELERATOR_KEYS:
            near = closest(key, ACCELERATOR_KEYS, n=1)
            hint = f' Did you mean accelerator.{near[0]}?' if near else ''
            raise ConfigError(f'accelerator.{key} = {cfg[key]!r} is not a supported setting.{hint} '
                              f'Supported: {", ".join(ACCELERATOR_KEYS)}')
    if isinstance(cfg.get('dataloader_config'), dict):
        from accelerate import DataLoaderConfiguration
        cfg['dataloader_config'] = DataLoaderConfiguration(**cfg['dataloader_config'])
    world = int(os.environ.get('WORLD_SIZE', '1'))
    if world > 1 and 'cpu' not in cfg:
        import torch
        if not torch.cuda.is_available():
            cfg['cpu'] = True  # several processes, no GPU: gloo on the CPU, not N lone ranks
    accelerator = Accelerator(**cfg)
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
    if not isinstance(seed, int):
        raise ConfigError(f'randomness.seed must be an int or None, got {seed!r}')
    set_seed(seed, device_specific=diff_rank_seed, deterministic=deterministic)
    return seed


def check_randomness(cfg: Any) -> dict:
    cfg = dict(cfg or {})
    for key in cfg:
        if key not in RANDOMNESS_KEYS:
            near = closest(key, RANDOMNESS_KEYS, n=1)
            hint = f' Did you mean randomness.{near[0]}?' if near else ''
            raise ConfigError(f'randomness.{key} is not a setting.{hint} Valid: {", ".join(RANDOMNESS_KEYS)}')
    return cfg
