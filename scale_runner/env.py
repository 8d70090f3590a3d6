"""Environment setup: the Accelerator from the ``accelerator`` config section, and seeds.

Precedence for every setting: a value in the config wins over the launcher's environment
(``accelerate launch --mixed_precision bf16`` sets ``ACCELERATE_MIXED_PRECISION``), which wins
over Accelerate's defaults. Unset config keys are simply not passed to ``Accelerator``.
On a CPU, ``bf16`` runs under CPU autocast; ``fp16`` has no grad scaler there (Accelerate
creates one only on an accelerator device).
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
OTHER_KEYS = ('dataloader_config', 'deepspeed', 'deepspeed_cpu_shm', 'fsdp', 'dynamo', 'compile',
              'timeout')
ACCELERATOR_KEYS = PASS_THROUGH + DDP_KEYS + OTHER_KEYS
RANDOMNESS_KEYS = ('seed', 'deterministic', 'diff_rank_seed')
MIXED_PRECISION = ('no', 'fp16', 'bf16', 'fp8')


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
    if cfg.get('mixed_precision') is not None and cfg['mixed_precision'] not in MIXED_PRECISION:
        raise ConfigError(f'accelerator.mixed_precision = {cfg["mixed_precision"]!r} is not valid: '
                          f'it takes one of {", ".join(map(repr, MIXED_PRECISION))}')
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
    group = {}
    if cfg.get('timeout'):
        # accelerator.timeout bounds a rank without progress (scale_runner.watchdog); the
        # backend's own timeout, twice that, is the last resort where the watchdog does not look
        group['timeout'] = datetime.timedelta(seconds=2 * float(cfg['timeout']))
    from .elastic import restart_init_method
    init_method = restart_init_method()
    if init_method is not None:  # a restarted worker: a fresh store namespace
        group['init_method'] = init_method
    if group:
        from accelerate.utils import InitProcessGroupKwargs
        given = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
        if given is None:
            handlers.append(InitProcessGroupKwargs(**group))
        elif given.init_method is None and 'init_method' in group:
            given.init_method = group['init_method']
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
    deepspeed_accumulation(ds, accumulative_counts)
    return DeepSpeedPlugin(hf_ds_config=ds, gradient_accumulation_steps=accumulative_counts)


def deepspeed_accumulation(ds: dict, accumulative_counts: int) -> None:
    """Make a DeepSpeed config's ``gradient_accumulation_steps`` ``accumulative_counts`` (the
    one source of truth): fill it when unset or ``'auto'``, refuse any other value. Checked on
    the config's ``accelerator.deepspeed`` before the Accelerator exists, and on the plugin's
    config (also one from the launcher, or a built Accelerator's) before the model is prepared."""
    steps = ds.get('gradient_accumulation_steps', 'auto')
    if steps not in ('auto', accumulative_counts):
        raise ConfigError(f'DeepSpeed gradient_accumulation_steps={steps} disagrees with '
                          f'optim_wrapper.accumulative_counts={accumulative_counts}: set it to '
                          f"'auto' or remove it from the DeepSpeed config (accumulative_counts is "
                          f'the one source of truth)')
    ds['gradient_accumulation_steps'] = accumulative_counts


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
    deepspeed = kwargs.get('deepspeed_plugin') is not None or _flag('ACCELERATE_USE_DEEPSPEED')
    if world > 1 and 'cpu' not in kwargs and not _has_accelerator() and not deepspeed:
        kwargs['cpu'] = True  # several processes, no GPU: gloo on the CPU, not N lone ranks
    fsdp = kwargs.get('fsdp_plugin')
    if fsdp is not None and _on_cpu(kwargs):
        # Accelerate would drop the plugin on the CPU and build DDP: the runner shards instead
        # (scale_runner.fsdp), so Accelerate never sees it.
        from .fsdp import check_cpu_plugin
        check_cpu_plugin(fsdp, (cfg or {}).get('fsdp'), kwargs)
        del kwargs['fsdp_plugin']
    cpu_deepspeed = deepspeed and _on_cpu(kwargs)
    if cpu_deepspeed:
        _check_cpu_deepspeed(kwargs)
    if deepspeed and 'LOCAL_RANK' not in os.environ:
        _single_process_env()  # no launcher: DeepSpeed still needs a (one-process) group
    if cpu_deepspeed:
        accelerator = _cpu_deepspeed(Accelerator, kwargs, bool((cfg or {}).get('deepspeed_cpu_shm')))
    else:
        accelerator = Accelerator(**kwargs)
    if world > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f'WORLD_SIZE={world} but Accelerate sees a single process: every rank would train '
            f'alone as rank 0 and write the same files. Launch with '
            f'`accelerate launch --multi_gpu --num_processes {world} -m scale_runner train CFG` '
            f'(on a CPU-only machine prefix ACCELERATE_USE_CPU=1).')
    if fsdp is not None and accelerator.distributed_type != 'FSDP':
        from .fsdp import keep_plugin  # the CPU, or one process: not silently ignored
        keep_plugin(accelerator, fsdp)
    return accelerator


def enable_flight_recorder(work_dir: Path) -> None:
    """Turn on NCCL's flight recorder unless the environment decided: the last 2,000
    collectives of every rank are kept, and a rank whose collective times out writes them to
    ``<work_dir>/nccl_trace/rank_<N>`` (read with ``python -m torch.distributed.flight_recorder
    .fr_trace``). Only on a CUDA machine, before the process group exists."""
    import torch
    if not torch.cuda.is_available():
        return
    os.environ.setdefault('TORCH_NCCL_TRACE_BUFFER_SIZE', '2000')
    os.environ.setdefault('TORCH_NCCL_DUMP_ON_TIMEOUT', '1')
    if 'TORCH_NCCL_DEBUG_INFO_TEMP_FILE' not in os.environ:
        (work_dir / 'nccl_trace').mkdir(parents=True, exist_ok=True)
        os.environ['TORCH_NCCL_DEBUG_INFO_TEMP_FILE'] = str(work_dir / 'nccl_trace' / 'rank_')


def _single_process_env() -> None:
    """What ``torchrun --nproc_per_node 1`` would set, for a run started without a launcher."""
    import socket
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    for key, value in (('RANK', '0'), ('LOCAL_RANK', '0'), ('WORLD_SIZE', '1'),
                       ('LOCAL_WORLD_SIZE', '1'), ('MASTER_ADDR', '127.0.0.1'),
                       ('MASTER_PORT', str(port))):
        os.environ.setdefault(key, value)


def _check_cpu_deepspeed(kwargs: dict) -> None:
    ds = getattr(kwargs.get('deepspeed_plugin'), 'deepspeed_config', None) or {}
    precision = kwargs.get('mixed_precision') or os.environ.get('ACCELERATE_MIXED_PRECISION')
    if precision == 'fp16' or (ds.get('fp16') or {}).get('enabled') is True:
        raise ConfigError("accelerator.mixed_precision='fp16': DeepSpeed does not support fp16 on "
                          "a CPU (its CPU accelerator refuses it); use 'bf16' or 'no', or a GPU")


def _cpu_deepspeed(Accelerator, kwargs: dict, shm: bool):
    """DeepSpeed on a machine without a GPU: Accelerate drops the plugin when told to use the
    CPU (``cpu=True`` / ``ACCELERATE_USE_CPU``) and builds DDP, and without a backend every rank
    starts alone as rank 0 of 1; so DeepSpeed starts its own process group over gloo.

    DeepSpeed's shared-memory all-reduce op is compiled with g++ at the first start (45-80 s)
    unless ``accelerator.deepspeed_cpu_shm=True``: gloo alone does the collectives."""
    from accelerate.utils import InitProcessGroupKwargs
    if not shm:
        import deepspeed.ops  # the table of ops DeepSpeed may build on this machine
        deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'] = False
    kwargs = dict(kwargs)
    kwargs.pop('cpu', None)
    handlers = list(kwargs.get('kwargs_handlers', []))
    group = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
    if group is None:
        handlers.append(InitProcessGroupKwargs(backend='gloo'))
    else:
        group.backend = 'gloo'
    kwargs['kwargs_handlers'] = handlers
    saved = os.environ.pop('ACCELERATE_USE_CPU', None)
    try:
        return Accelerator(**kwargs)
    finally:
        if saved is not None:
            os.environ['ACCELERATE_USE_CPU'] = saved


def _on_cpu(kwargs: dict) -> bool:
    """Whether the Accelerator built from ``kwargs`` will run on the CPU."""
    return bool(kwargs.get('cpu')) or _flag('ACCELERATE_USE_CPU') or not _has_accelerator()


def _flag(name: str) -> bool:
    from accelerate.utils import parse_flag_from_env
    return parse_flag_from_env(name)


def check_train_setup(accelerator, dataloader, optim_wrapper) -> None:
    """Checks and fills done before the model is prepared for training (every rank calls it).

    * Every rank must run the same number of train iterations per pass: otherwise DDP's
      all-reduce waits forever on the rank with more batches (``even_batches=False`` with a
      batch count that does not divide by the number of processes). All ranks raise together.
    * DeepSpeed ``'auto'`` values that Accelerate can only fill when the dataloader is prepared
      in the same call as the model: micro batch size, gradient accumulation (from
      ``optim_wrapper.accumulative_counts``) and gradient clipping (from ``clip_grad``).
    """
    n = _safe_len(dataloader)
    if accelerator.num_processes > 1 and n is not None:
        from .collective import gather
        lengths = gather(n)
        if len(set(lengths)) > 1:
            raise ConfigError(
                f'the train dataloader has {lengths} batches on ranks 0..{len(lengths) - 1}: ranks '
                f'would step a different number of times and DDP would hang. Keep '
                f'accelerator.dataloader_config.even_batches=True (the default), or set '
                f'train_dataloader.drop_last=True, or make the number of batches divisible by '
                f'{accelerator.num_processes}')
    plugin = getattr(accelerator.state, 'deepspeed_plugin', None)
    if plugin is None:
        return
    ds = plugin.deepspeed_config
    deepspeed_accumulation(ds, optim_wrapper.accumulative_counts)
    if ds.get('train_micro_batch_size_per_gpu', 'auto') == 'auto':
        batch_size = micro_batch_size(dataloader, accelerator.num_processes)
        if batch_size is None:
            raise ConfigError('DeepSpeed needs train_micro_batch_size_per_gpu: set it in the '
                              'DeepSpeed config or give train_dataloader a batch_size')
        ds['train_micro_batch_size_per_gpu'] = batch_size
    clip = optim_wrapper.clip_grad or {}
    if 'clip_value' in clip:
        raise ConfigError('optim_wrapper.clip_grad=dict(clip_value=...) is not supported by '
                          'DeepSpeed: use dict(max_norm=...)')
    if ds.get('gradient_clipping', 'auto') == 'auto':
        # DeepSpeed clips inside its step; Accelerate would otherwise default to 1.0.
        ds['gradient_clipping'] = float(clip.get('max_norm', 0.0))


def micro_batch_size(dataloader, num_processes: int) -> int | None:
    """Samples per iteration on one process. A prepared loader has ``batch_size=None`` (its
    batch sampler batches): read the sampler's, per process unless batches are split."""
    size = getattr(dataloader, 'batch_size', None)
    if size is not None:
        return size
    sampler = getattr(dataloader, 'batch_sampler', None)
    size = getattr(sampler, 'batch_size', None)
    if size is not None and getattr(sampler, 'split_batches', False):
        size //= num_processes
    return size


def _safe_len(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _has_accelerator() -> bool:
    import torch
    acc = getattr(torch, 'accelerator', None)  # torch >= 2.6: CUDA, XPU, HPU, ...
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def set_randomness(accelerator, seed: int | None = None, deterministic: bool = False,
                   diff_rank_seed: bool = False) -> int:
    """Seed python/numpy/torch identically on every rank (or per rank); return the seed."""
    from accelerate.utils import set_seed

    from .collective import from_main
    if seed is None:
        seed = from_main(random.randrange(2**31))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f'randomness.seed must be an int or None, got {seed!r}')
    set_seed(seed, device_specific=diff_rank_seed, deterministic=deterministic)
    return seed


def check_randomness(cfg: Any) -> dict:
    cfg = dict(cfg or {})
    _check_keys(cfg, RANDOMNESS_KEYS, 'randomness')
    for key in ('deterministic', 'diff_rank_seed'):
        if key in cfg and not isinstance(cfg[key], bool):
            raise ConfigError(f'randomness.{key} = {cfg[key]!r} is not valid: it takes True or False')
    return cfg
