"""What a checkpoint holds of a run: its named stateful parts, collected and restored.

The application state maps stable names to the parts that have ``state_dict()`` /
``load_state_dict()``::

    model                  the weights (``model.safetensors``; under FSDP2 each rank's shards)
    train_state            counters of completed work (``TrainState``)
    optim_wrapper          optimizer, loss scaler and update counters (``OptimWrapper``)
    param_schedulers.<i>   each parameter scheduler
    hooks.<name>           each hook with ``state_dict``: its ``default_hooks`` name, or for any
                           other hook its class name (``<class>_2``, ... for repeats)

plus ``meta`` (versions, world size, batch sizes) and, per process, ``rng`` and ``grad`` (its
partial gradients inside an accumulation window). The writer (``format.py``) stores the
mapping without knowing what a part is. A user's hook that defines ``state_dict`` and
``load_state_dict`` is saved and restored with no other code.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch

from .format import FORMAT_VERSION, CheckpointError, read_rank_state, sharded_keys
from .sharded import SHARDED_DIR, is_dtensor, load_shards


# ---- the parts ---------------------------------------------------------------------------------
def state_parts(runner, optimizer: bool = True, schedulers: bool = True) -> dict[str, Any]:
    """The runner's stateful parts by stable name (the model apart: see :func:`model_state`)."""
    parts: dict[str, Any] = {'train_state': runner.state}
    if optimizer and runner.optim_wrapper is not None:
        parts['optim_wrapper'] = runner.optim_wrapper
    if schedulers:
        parts.update((f'param_schedulers.{i}', s) for i, s in enumerate(runner.param_schedulers))
    parts.update((f'hooks.{name}', hook) for name, hook in runner.named_hooks()
                 if callable(getattr(hook, 'state_dict', None)))
    return parts


def model_state(runner) -> tuple[dict | None, dict | None]:
    """``(whole weights, sharded weights)``: one of them. Collective (DeepSpeed ZeRO-3 gathers
    its partitions; FSDP2 shards are kept as they are)."""
    from ..model import unwrap
    from ..optim import FAST_TYPES
    from ..sharding import is_sharded
    from .zero import full_weights, is_deepspeed
    if is_deepspeed(runner.accelerator):  # ZeRO: the fp32 master weights, put together
        return full_weights(runner.model), None
    module = unwrap(runner.model)
    if is_sharded(module):
        return None, module.state_dict()
    if runner.accelerator.distributed_type in FAST_TYPES:
        # What Accelerate's get_state_dict does for these, less its unwrap_model, which imports
        # deepspeed whenever it is installed (0.45 s at a run's first save)
        return module.state_dict(), None
    return runner.accelerator.get_state_dict(runner.model), None


def collect_state(runner, save_optimizer: bool = True, save_param_scheduler: bool = True):
    """``(model_state, state, rank_state)`` for :class:`~.format.CheckpointWriter`. Every
    rank calls it (collective)."""
    from .. import __version__
    acc = runner.accelerator
    meta = {'scale_runner': __version__, 'torch': torch.__version__,
            'world_size': acc.num_processes, 'seed': runner.seed,
            'experiment_name': runner.experiment_name,
            'cfg': _jsonable(runner.cfg.to_dict()) if runner.cfg is not None else None}
    if runner.train_loop is not None:
        meta['train_batch_size'] = train_batch_size(runner.train_loop.dataloader)
    if runner.optim_wrapper is not None:
        meta['accumulative_counts'] = runner.optim_wrapper.accumulative_counts
    from .zero import is_deepspeed, zero_stage, zero_state
    deepspeed = is_deepspeed(acc) and runner.optim_wrapper is not None
    if deepspeed:
        meta['zero_stage'] = zero_stage(runner.model)
        if runner.state.iter % runner.optim_wrapper.accumulative_counts:
            # the window's partial gradients are inside DeepSpeed's buckets: not saved
            meta['zero_inside_window'] = True
    state: dict = {'meta': meta}
    state.update((name, part.state_dict()) for name, part in
                 state_parts(runner, save_optimizer, save_param_scheduler).items())
    whole, sharded = model_state(runner)
    if sharded is not None:
        state['model'] = sharded
    grads = partial_gradients(runner)
    if any(is_dtensor(g) for g in grads.values()):
        state['grads'] = grads  # sharded gradients: each rank writes its shards
        grads = {}
    rank_state = {'rng': rng_state()}
    if deepspeed and save_optimizer:  # each rank's ZeRO partition, in its own files
        rank_state['zero'] = zero_state(runner.model)
    data = _stream_call('loader_state', runner)  # a streamed train set: this rank's position
    if data is not None:
        rank_state['data'] = data
    if grads:
        rank_state['grad'] = grads
    return whole, state, rank_state


def partial_gradients(runner) -> dict[str, torch.Tensor]:
    """This process's gradients when a checkpoint falls inside an accumulation window.

    Exact resume restores them: every rank's own, since under ``no_sync`` they are not yet
    all-reduced. At a window boundary gradients are ``None`` (``zero_grad(set_to_none=True)``)
    and nothing is written.
    """
    wrapper = runner.optim_wrapper
    if (wrapper is None or wrapper.accumulative_counts == 1 or runner.model is None
            or runner.accelerator.distributed_type == 'DEEPSPEED'):  # (inside its buckets)
        return {}
    from ..model import unwrap
    return {name: p.grad for name, p in unwrap(runner.model).named_parameters() if p.grad is not None}


def train_batch_size(dataloader) -> int | None:
    """Samples per train iteration over all processes (what the sampler position counts)."""
    return getattr(dataloader, 'total_batch_size', None) or getattr(dataloader, 'batch_size', None)


def _jsonable(obj):
    from ..config import to_plain
    return json.loads(json.dumps(to_plain(obj), default=repr))


# ---- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every RNG this process uses: torch (CPU and each CUDA device), Python, NumPy."""
    state: dict = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = list(torch.cuda.get_rng_state_all())
    version, internal, gauss = random.getstate()
    state['python'] = [version, list(internal), gauss]
    try:
        import numpy as np
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state['numpy'] = {'keys': torch.from_numpy(keys.astype('int64')),
                          'rest': [name, pos, has_gauss, cached]}
    except ImportError:  # numpy is optional
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if 'numpy' in state:
        import numpy as np
        name, pos, has_gauss, cached = state['numpy']['rest']
        np.random.set_state((name, state['numpy']['keys'].numpy().astype('uint32'), pos,
                             has_gauss, cached))


def seed_new_rank(seed: int, rank: int, iteration: int) -> None:
    """RNGs of a rank the checkpoint has no state for (more processes than it was written by):
    derived from the run's seed, the rank and the position, so a rerun draws the same."""
    from ..data import _mix
    value = _mix(seed or 0, rank, iteration)
    random.seed(value)
    torch.manual_seed(value)
    try:
        import numpy as np
        np.random.seed(value % 2**32)
    except ImportError:
        pass


# ---- weights -----------------------------------------------------------------------------------
def load_weights(module: torch.nn.Module, weights: dict, source: str, strict: bool = True) -> None:
    """Load ``weights`` (whole tensors, or ``DTensor`` shards) into ``module``; in strict mode
    refuse, loading nothing, on any missing or unexpected key, and always on a shape mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in weights]
    unexpected = [k for k in weights if k not in own]
    shapes = [f'{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(own[k].shape)}'
              for k in own if k in weights and weights[k].shape != own[k].shape]
    if shapes or (strict and (missing or unexpected)):
        lines = [f'cannot load weights from {source} into {type(module).__name__} '
                 f'(nothing was loaded):']
        if missing:
            lines.append(f'  missing keys ({len(missing)}): {", ".join(missing)}')
        if unexpected:
            lines.append(f'  unexpected keys ({len(unexpected)}): {", ".join(unexpected)}')
        if shapes:
            lines.append(f'  shape mismatches ({len(shapes)}): ' + '; '.join(shapes))
        lines.append('  Pass strict=False (load_from with strict=False) to load the matching keys only.'
                     if not shapes else '  Shape mismatches cannot be loaded.')
        raise CheckpointError('\n'.join(lines))
    from ..sharding import is_sharded, load_model_state
    weights = {k: v for k, v in weights.items() if k in own}
    if is_sharded(module):  # FSDP2: DTensor parameters take their shards
        load_model_state(module, weights)
    else:
        module.load_state_dict({k: v.full_tensor() if is_dtensor(v) else v
                                for k, v in weights.items()}, strict=False)


# ---- restoring ---------------------------------------------------------------------------------
def restore_state(runner, ckpt: dict) -> None:
    """Resume ``runner`` from a checkpoint read by :func:`~.format.read_checkpoint`: weights,
    every named part, this rank's RNGs and partial gradients. Collective under FSDP2.

    The same number of processes and batch size continue bit for bit. Another number of
    processes (or another per-process batch size) continues from the same *global* sample
    position of the epoch's order, with model and optimizer state resharded; the log says so.
    """
    state, path = ckpt['state'], ckpt['path']
    version = state.get('format_version')
    if not isinstance(version, int) or version < 4:
        raise CheckpointError(
            f'{path} was written by an older scale_runner (checkpoint format {version}, this one '
            f'reads {FORMAT_VERSION} for resume): resume it with the version that wrote it, or '
            f'start a new run from its weights with load_from={path!r}')
    meta = state.get('meta', {})
    if meta.get('optimizer_not_saved') and runner.optim_wrapper is not None:
        raise CheckpointError(
            f'{path} holds no optimizer state ({meta["optimizer_not_saved"]} are not saved '
            f'yet), so training cannot resume exactly from it; use load_from={path!r} to start '
            f'a new run from its weights')
    change = _changes(runner, meta, path)
    _stream_call('restore_loader', runner, ckpt, change)  # refuses another setup for a stream
    _load_sharded(runner, state, path)
    from ..model import unwrap
    from .zero import check_zero_resume, is_deepspeed, load_zero_weights
    deepspeed = is_deepspeed(runner.accelerator)
    check_zero_resume(runner, meta, ckpt['rank'], path, change)
    weights = ckpt['model'] if ckpt['model'] is not None else state.get('model')
    if deepspeed:
        load_zero_weights(runner.model, weights or {}, path)
    else:
        load_weights(unwrap(runner.model), weights or {}, path)
    parts = state_parts(runner)
    for name, part in parts.items():
        if name in state:
            part.load_state_dict(state[name])
        elif name.startswith('hooks.'):
            runner.logger.warning(f'{path} holds no state for {name} ({type(part).__name__}): '
                                  f'it starts fresh')
    rank = runner.accelerator.process_index
    rank_state = ckpt['rank']
    if deepspeed and 'zero' in rank_state:
        from .zero import load_zero_state
        load_zero_state(runner.model, rank_state['zero'], rank, ckpt['world_size'], path)
    if 'rng' in rank_state:
        set_rng_state(rank_state['rng'])
    else:
        seed_new_rank(runner.seed, rank, runner.state.iter)
    grads = state.get('grads') or rank_state.get('grad')
    if change and ckpt['world_size'] and not state.get('grads'):
        grads = _mean_gradients(ckpt)
    if not deepspeed:  # (a ZeRO checkpoint is never inside an accumulation window)
        _restore_gradients(runner, grads, path)
    if change:
        _continue_position(runner, meta, change)


def _stream_call(name: str, *args):
    """``scale_runner.streaming.<name>(*args)`` if a stream was ever built (else None)."""
    from ..data import streaming
    stream = streaming()
    return getattr(stream, name)(*args) if stream is not None else None


def _changes(runner, meta: dict, path: str) -> str | None:
    """What differs from the run that wrote the checkpoint (processes, global batch), or
    None; a different accumulative_counts is refused."""
    saved = meta.get('accumulative_counts')
    now = getattr(runner.optim_wrapper, 'accumulative_counts', None)
    if saved is not None and now is not None and saved != now:
        raise CheckpointError(
            f'{path} was saved with optim_wrapper.accumulative_counts = {saved} but this run has '
            f'{now}: the accumulation window and the schedule are counted in it, so resume '
            f'needs the same value; use load_from={path!r} to start a new run from its weights')
    ws, ws_now = meta.get('world_size'), runner.accelerator.num_processes
    batch = meta.get('train_batch_size')
    batch_now = (train_batch_size(runner.train_loop.dataloader)
                 if runner.train_loop is not None else None)
    changed = []
    if ws is not None and ws != ws_now:
        changed.append(f'{ws} -> {ws_now} processes')
    if batch is not None and batch_now is not None and batch != batch_now:
        changed.append(f'global batch {batch} -> {batch_now} samples per iteration')
    return ', '.join(changed) or None


def _load_sharded(runner, state: dict, path: str) -> None:
    """Read the checkpoint's sharded tensors into ``state``: a tensor this run shards too is
    read as its own shard, straight into the live one (resharded by DCP's planner); any other
    as a whole tensor."""
    keys = sharded_keys(state)
    if not keys:
        return
    from ..model import unwrap
    from .format import join_tensors, sharded_tensors
    live = {name: part.state_dict() for name, part in state_parts(runner).items()}
    live['model'] = unwrap(runner.model).state_dict()
    if 'grads' in state:  # a sharded accumulation window: the live gradients' shards
        live['grads'] = {n: p.grad for n, p in unwrap(runner.model).named_parameters()
                         if p.grad is not None}
    mine = sharded_tensors(live)
    targets = {k: mine.get(k) for k in keys}
    loaded = load_shards(Path(path) / SHARDED_DIR, targets, path)
    for name in list(state):
        if name != 'meta':
            state[name] = join_tensors(state[name], loaded)


def _mean_gradients(ckpt: dict) -> dict | None:
    """The mean of every saved rank's partial gradients (another number of processes resumes
    inside an accumulation window: the all-reduce at its end averages, so each new rank
    starting from the mean gives the same update in expectation)."""
    grads = [read_rank_state(Path(ckpt['path']), ckpt['files'], r).get('grad')
             for r in range(ckpt['world_size'])]
    grads = [g for g in grads if g]
    if not grads:
        return None
    return {k: sum(g[k].double() for g in grads).div(len(grads)).to(grads[0][k].dtype)
            for k in grads[0]}


def _restore_gradients(runner, grads: dict | None, path: str) -> None:
    """Put a checkpoint's partial gradients (an open accumulation window) back on the params."""
    from ..model import unwrap
    params = dict(unwrap(runner.model).named_parameters())
    for p in params.values():
        p.grad = None
    if not grads:
        return
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise CheckpointError(f'{path}: partial gradients for unknown parameters {unknown}')
    for name, g in grads.items():
        p = params[name]
        if g.shape != p.shape:
            raise CheckpointError(f'{path}: partial gradient of {name} has shape {tuple(g.shape)}, '
                                  f'the parameter {tuple(p.shape)}')
        if is_dtensor(p) and not is_dtensor(g):  # a whole gradient for a sharded parameter
            from ..sharding import shard_like
            g = shard_like(g, p)
        p.grad = g.clone() if is_dtensor(g) else g.to(device=p.device, dtype=p.dtype).clone()


def _continue_position(runner, meta: dict, change: str) -> None:
    """Continue the epoch at the same global sample: the checkpoint's run had used
    ``inner_iter * saved global batch`` samples of this epoch's order."""
    from ..data import get_sampler
    state, loop = runner.state, runner.train_loop
    used = state.inner_iter * int(meta.get('train_batch_size') or 0)
    batch = train_batch_size(loop.dataloader) or 1
    sampler = get_sampler(loop.dataloader)
    total = len(sampler) if sampler is not None and hasattr(sampler, '__len__') else None
    state.resume_sample = used
    ends = total is not None and used >= total
    state.inner_iter = len(loop.dataloader) if ends else used // batch
    runner.logger.warning(
        f'resuming with a different setup ({change}): model and optimizer state are resharded '
        f'for this run, and the data continues at sample {used} of epoch {state.epoch + 1}\'s '
        f'order (every sample of the epoch is used once); counters continue at iteration '
        f'{state.iter}. The continuation is not bit-identical to one with the original setup.')
