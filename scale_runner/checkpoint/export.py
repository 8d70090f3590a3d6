"""``scale-runner export``: a checkpoint's weights (or EMA average) as one ``.safetensors`` file."""
from __future__ import annotations

import os
from pathlib import Path

from safetensors.torch import save_file

from .format import (FORMAT_VERSION, CheckpointError, _fsync, _umask, model_tensors,
                     read_checkpoint, read_model_weights, whole, whole_weights)


def export_weights(src: str | os.PathLike, out: str | os.PathLike, ema: bool = False) -> Path:
    """Write the model weights of checkpoint ``src`` (verified) to the ``.safetensors`` file ``out``.

    Nothing else (optimizer, RNG, counters) is exported; a sharded checkpoint's weights are put
    together from every rank's shards on this machine, without torch.distributed. ``ema=True``:
    the EMAHook's average instead of the training weights (entries it does not average, such as
    buffers without ``update_buffers``, stay the training ones). The file's metadata says where
    the weights come from: ``format=pt``, ``producer``, ``source``, ``epoch``/``iter`` when
    known, and ``weights=ema`` with ``ema_steps`` for an average. The file is written under a
    temporary name and renamed, so ``out`` is never half written.
    """
    from .. import __version__
    src, out = Path(src), Path(out)
    if out.suffix != '.safetensors':
        raise CheckpointError(f'{out}: the export target must be a .safetensors file')
    meta = {'format': 'pt', 'producer': f'scale_runner {__version__}',
            'scale_runner_checkpoint_format': str(FORMAT_VERSION), 'source': src.name}
    if not src.is_dir():
        if ema:
            raise CheckpointError(f'{src}: an EMA average is exported from a checkpoint directory '
                                  f'(a .safetensors file holds one set of weights)')
        weights = read_model_weights(src)
    else:
        ckpt = read_checkpoint(src)  # verified once
        weights, state = whole_weights(ckpt), ckpt['state']
        train_state = state.get('train_state') or {}
        for key in ('epoch', 'iter'):
            if isinstance(train_state.get(key), int):
                meta[key] = str(train_state[key])
        name = (state.get('meta') or {}).get('experiment_name')
        if isinstance(name, str):
            meta['experiment_name'] = name
        if ema:
            average = _average(state, src)
            weights = _with_average(weights, whole(ckpt, average['ema']), src)
            meta['weights'] = 'ema'
            meta['ema_steps'] = str(average.get('steps', 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f'.{out.name}.tmp'
    save_file(model_tensors(weights), tmp, metadata=meta)
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files 0600
    _fsync(tmp)
    os.replace(tmp, out)
    _fsync(out.parent)
    return out


def _average(state: dict, src: Path) -> dict:
    """The checkpoint's one EMAHook state (``hooks.<name>`` holding an ``ema`` average)."""
    found = {k: v for k, v in state.items()
             if k.startswith('hooks.') and isinstance(v, dict) and v.get('ema')}
    if not found:
        raise CheckpointError(f'{src} holds no EMA average: it was written without EMAHook in '
                              f'custom_hooks; export without --ema for the training weights')
    if len(found) > 1:
        raise CheckpointError(f'{src} holds several EMA averages ({", ".join(sorted(found))}): '
                              f'export one with scale_runner.checkpoint.export_weights')
    return next(iter(found.values()))


def _with_average(weights: dict, average: dict, src: Path) -> dict:
    """``weights`` with the entries the EMAHook averaged replaced by the average."""
    unknown = sorted(k for k in average if k not in weights)
    if unknown:
        raise CheckpointError(f'{src}: the EMA average has entries the model weights do not: '
                              f'{unknown[:5]}')
    return {**weights, **average}
