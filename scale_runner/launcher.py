"""MMEngine's ``launcher`` and ``env_cfg`` runner arguments, on Accelerate.

Accelerate starts the processes (``accelerate launch``, ``torchrun``, ``srun`` with its
environment) and initializes the process group, so ``launcher`` only states what the user
expects: it is checked against the processes Accelerate found and a mismatch is logged.
``env_cfg`` is applied: ``cudnn_benchmark``, ``mp_cfg.mp_start_method`` /
``opencv_num_threads``, and ``dist_cfg`` (``backend``, ``timeout`` in seconds) becomes the
Accelerator's process-group arguments (the backend only when ``WORLD_SIZE > 1``: a single
process has no process group).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any

from .errors import ConfigError, check_keys, did_you_mean

LAUNCHERS = ('none', 'pytorch', 'slurm', 'mpi')
ENV_KEYS = ('cudnn_benchmark', 'mp_cfg', 'dist_cfg', 'resource_limit')
MP_KEYS = ('mp_start_method', 'opencv_num_threads')
DIST_KEYS = ('backend', 'timeout')


def check_launcher(launcher: Any) -> str:
    if launcher is None:
        return 'none'
    if launcher not in LAUNCHERS:
        near = did_you_mean(str(launcher), LAUNCHERS)
        did = f' (did you mean {near!r}?)' if near else ''
        raise ConfigError(f'launcher = {launcher!r} is not valid{did}: it takes '
                          f'{", ".join(map(repr, LAUNCHERS))}; the processes themselves are '
                          f'started by accelerate launch / torchrun / srun')
    return launcher


def _keys(cfg: dict, valid: tuple, where: str) -> None:
    check_keys(cfg, valid, where, f'an {where.split(".")[0]}')


def check_env_cfg(env_cfg: Any) -> dict:
    if env_cfg is None:
        return {}
    if not isinstance(env_cfg, dict):
        raise ConfigError(f"env_cfg = {env_cfg!r} is not valid: it takes a dict, e.g. "
                          f"env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend='nccl'))")
    env_cfg = dict(env_cfg)
    _keys(env_cfg, ENV_KEYS, 'env_cfg')
    if not isinstance(env_cfg.get('cudnn_benchmark', False), bool):
        raise ConfigError(f'env_cfg.cudnn_benchmark = {env_cfg["cudnn_benchmark"]!r} is not '
                          f'valid: it takes True or False')
    for name, valid in (('mp_cfg', MP_KEYS), ('dist_cfg', DIST_KEYS)):
        sub = env_cfg.get(name)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            raise ConfigError(f'env_cfg.{name} = {sub!r} is not valid: it takes a dict with '
                              f'{", ".join(valid)}')
        _keys(sub, valid, f'env_cfg.{name}')
    method = (env_cfg.get('mp_cfg') or {}).get('mp_start_method')
    if method is not None and method not in multiprocessing.get_all_start_methods():
        raise ConfigError(f'env_cfg.mp_cfg.mp_start_method = {method!r} is not valid here: it takes '
                          f'one of {multiprocessing.get_all_start_methods()}')
    timeout = (env_cfg.get('dist_cfg') or {}).get('timeout')
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise ConfigError(f'env_cfg.dist_cfg.timeout = {timeout!r} is not valid: it takes a '
                          f'positive number of seconds')
    if env_cfg.get('resource_limit') is not None and (
            not isinstance(env_cfg['resource_limit'], int) or env_cfg['resource_limit'] < 1):
        raise ConfigError(f'env_cfg.resource_limit = {env_cfg["resource_limit"]!r} is not valid: it '
                          f'takes a positive int (the open-file limit)')
    return env_cfg


def accelerator_with_dist(accelerator_cfg: Any, env_cfg: dict) -> Any:
    """``accelerator`` with ``env_cfg.dist_cfg`` as its process-group arguments."""
    dist = env_cfg.get('dist_cfg') or {}
    if not dist or (accelerator_cfg is not None and not isinstance(accelerator_cfg, dict)):
        return accelerator_cfg  # a built Accelerator: its process group is set up already
    cfg = dict(accelerator_cfg or {})
    if 'timeout' in dist:
        if cfg.get('timeout') is not None and cfg['timeout'] != dist['timeout']:
            raise ConfigError(f'env_cfg.dist_cfg.timeout = {dist["timeout"]!r} and accelerator.timeout'
                              f' = {cfg["timeout"]!r} disagree: set one of them')
        cfg['timeout'] = dist['timeout']
    # A backend makes Accelerate initialize a process group: only for a distributed launch
    if dist.get('backend') is not None and int(os.environ.get('WORLD_SIZE', '1') or 1) > 1:
        from accelerate.utils import InitProcessGroupKwargs
        handlers = list(cfg.get('kwargs_handlers') or [])
        if any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
            raise ConfigError('env_cfg.dist_cfg.backend and an InitProcessGroupKwargs in '
                              'accelerator.kwargs_handlers both set the process group: set one')
        handlers.append(InitProcessGroupKwargs(backend=dist['backend']))
        cfg['kwargs_handlers'] = handlers
    return cfg


def apply_env_cfg(env_cfg: dict, launcher: str, accelerator, logger) -> None:
    """Apply ``env_cfg`` in this process (after the Accelerator exists, before any model or
    dataloader is built) and say if ``launcher`` does not match the processes found."""
    if 'cudnn_benchmark' in env_cfg:
        import torch
        torch.backends.cudnn.benchmark = env_cfg['cudnn_benchmark']
    mp = env_cfg.get('mp_cfg') or {}
    method = mp.get('mp_start_method')
    if method is not None and multiprocessing.get_start_method(allow_none=True) != method:
        multiprocessing.set_start_method(method, force=True)
    if mp.get('opencv_num_threads') is not None:
        try:
            import cv2
            cv2.setNumThreads(int(mp['opencv_num_threads']))
        except ImportError:
            pass  # no OpenCV: nothing to limit
    if env_cfg.get('resource_limit'):
        try:
            import resource
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = min(max(soft, env_cfg['resource_limit']), hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ImportError, ValueError, OSError):
            pass
    # launcher='none' (the default) with several processes is how every accelerate launch /
    # torchrun job starts: Accelerate found them, nothing to say.
    if launcher != 'none' and accelerator.num_processes == 1:
        logger.warning(f'launcher={launcher!r} but this is a single process: start the job with '
                       f'accelerate launch, torchrun or srun to run distributed')
