"""tests/test_sharding.py's job, run on 2 ranks by ``torch.distributed.run``: FSDP2
(``fully_shard``) training, a sharded checkpoint (each rank writes its own shards), exact
resume; argv[1] is the output directory."""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from scale_runner.checkpoint import CheckpointWriter, join_tensors, load_weights, read_checkpoint
from scale_runner.checkpoint.format import sharded_keys, sharded_tensors
from scale_runner.checkpoint.sharded import load_shards
from scale_runner.sharding import is_sharded
from scale_runner.shutdown import register_drain
from fsdp2_parts import build, train

acc = Accelerator(cpu=True)  # the gloo process group of the two ranks
register_drain()  # what Runner does: no abort at interpreter exit (scale_runner.shutdown)


def full(model):
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


model, wrapper = build()
assert is_sharded(model) and wrapper._sharded is model
train(model, wrapper, 0, 3, acc.process_index)
path = CheckpointWriter(acc).write(Path(sys.argv[1]) / 'ckpt', None,
                                   {'model': model.state_dict(), 'optim_wrapper': wrapper.state_dict()})
train(model, wrapper, 3, 2, acc.process_index)
expected = full(model)

model, wrapper = build()
ckpt = read_checkpoint(path, acc.process_index)
assert ckpt['model'] is None  # no rank held the whole weights: only shards were written
state = ckpt['state']
assert set(state['optim_wrapper']['state']) == {'0.weight', '0.bias', '2.weight', '2.bias'}
live = {'model': model.state_dict(), 'optim_wrapper': wrapper.state_dict()}
loaded = load_shards(path / 'sharded', {k: sharded_tensors(live).get(k) for k in sharded_keys(state)},
                     str(path))
state = join_tensors(state, loaded)
load_weights(model, state['model'], str(path))
wrapper.load_state_dict(state['optim_wrapper'])
train(model, wrapper, 3, 2, acc.process_index)
got = full(model)
assert all(torch.equal(expected[k], got[k]) for k in expected), 'resumed weights differ'
print(f'RESUMED_EXACTLY_{acc.process_index}', flush=True)
