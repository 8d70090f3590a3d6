"""tests/test_sharded_checkpoint.py's job, run on 2 gloo ranks by ``torch.distributed.run``:
real FSDP2 (``fully_shard``) training whose sharded checkpoints are written by
``CheckpointWriter``, as the runner writes them (sharded model and optimizer moments, a hook's
whole tensors in ``state.safetensors``, every rank's RNG state).

argv: the output directory, then the mode:

``save``
    train 2 steps, save ``ckpts/iter_2`` (A); train 1 more, save ``ckpts/iter_3`` (B); train
    1 more and start ``ckpts/iter_4`` (C): once a rank's shards of C are on disk it writes
    ``in_save_<rank>`` (its pid) and sleeps, for the test to SIGKILL it (both ranks).
``kill-rename``
    A and B have the same name, ``ckpts/last`` (a checkpoint saved again under its name);
    rank 0 is SIGKILLed right after it swapped B into A's place (A, now under B's temporary
    name, not yet removed).

Before each save rank 0 writes the full (gathered) weights as ``expected_iter_<n>.safetensors``
(what reading or exporting that checkpoint must give); after it every rank prints
``SAVED_<n>_<rank>``.
"""

import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

import scale_runner.checkpoint.format as fmt
from scale_runner.checkpoint import CheckpointWriter
from scale_runner.checkpoint.state import rng_state
from scale_runner.shutdown import register_drain
from fsdp2_parts import build
from fsdp2_parts import train as fsdp2_train

out, mode = Path(sys.argv[1]), sys.argv[2]
acc = Accelerator(cpu=True)  # the gloo process group of the two ranks
register_drain()
rank = acc.process_index
root = out / 'ckpts'

model, wrapper = build()


def train(first, n):
    fsdp2_train(model, wrapper, first, n, rank)


def save(name, step):
    state = {'model': model.state_dict(), 'optim_wrapper': wrapper.state_dict(),
             'train_state': {'iter': step, 'epoch': 0},
             'hooks.Probe': {'count': step, 'vec': torch.arange(3.0) * step}}
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}  # collective
    if rank == 0:
        save_file({k: v.contiguous() for k, v in full.items()}, out / f'expected_iter_{step}.safetensors')
    acc.wait_for_everyone()
    path = CheckpointWriter(acc).write(root / name, None, state, {'rng': rng_state()})
    print(f'SAVED_{step}_{rank}', flush=True)
    return path


train(0, 2)
save('last' if mode == 'kill-rename' else 'iter_2', 2)
train(2, 1)

if mode == 'kill-rename' and rank == 0:
    real_exchange = fmt._exchange

    def killed_exchange(a, b):  # killed right after the swap, before the old one is removed
        if not real_exchange(a, b):
            raise SystemExit('no renameat2(RENAME_EXCHANGE) here')
        os.kill(os.getpid(), signal.SIGKILL)
    fmt._exchange = killed_exchange
save('last' if mode == 'kill-rename' else 'iter_3', 3)

if mode == 'save':
    train(3, 1)
    real_save_shards = fmt.save_shards

    def slow_save_shards(*args, **kwargs):
        names = real_save_shards(*args, **kwargs)
        (out / f'in_save_{rank}').write_text(str(os.getpid()))
        time.sleep(120)  # the test SIGKILLs this process here
        return names
    fmt.save_shards = slow_save_shards
    save('iter_4', 4)
