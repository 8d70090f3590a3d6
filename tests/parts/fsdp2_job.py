"""tests/test_sharding.py's job, run on 2 ranks by ``torch.distributed.run``: FSDP2
(``fully_shard``) training, a checkpoint of full tensors, exact resume; argv[1] is the output
directory."""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

from scale_runner import ConfigError
from scale_runner.checkpoint import CheckpointWriter, check_weights, read_checkpoint
from scale_runner.hooks import EMAHook
from scale_runner.optim import OptimWrapper
from scale_runner.sharding import is_sharded
from scale_runner.shutdown import register_drain

acc = Accelerator(cpu=True)  # the gloo process group of the two ranks
register_drain()  # what Runner does: no abort at interpreter exit (scale_runner.shutdown)


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    wrapper = OptimWrapper(torch.optim.AdamW(model.parameters(), lr=1e-2))
    wrapper.bind(None, model)
    return model, wrapper


def train(model, wrapper, first, n):
    for i in range(first, first + n):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(i * 2 + acc.process_index))
        wrapper.update_params(model(x).square().mean())


def full(model):
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


model, wrapper = build()
assert is_sharded(model) and wrapper._sharded is model
try:  # its averages would be DTensor shards: refused before training, not at a checkpoint
    EMAHook().before_run(SimpleNamespace(model=model))
    raise AssertionError('EMAHook accepted sharded parameters')
except ConfigError as e:
    assert 'FSDP2' in str(e), e
train(model, wrapper, 0, 3)
weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
path = CheckpointWriter(acc).write(Path(sys.argv[1]) / 'ckpt', weights,
                                   {'optimizer': wrapper.state_dict()})
train(model, wrapper, 3, 2)
expected = full(model)

model, wrapper = build()
ckpt = read_checkpoint(path, acc.process_index)
assert set(ckpt['state']['optimizer']['state']) == {'0.weight', '0.bias', '2.weight', '2.bias'}
check_weights(model, ckpt['model'], str(path))
wrapper.load_state_dict(ckpt['state']['optimizer'])
train(model, wrapper, 3, 2)
got = full(model)
assert all(torch.equal(expected[k], got[k]) for k in expected), 'resumed weights differ'
print(f'RESUMED_EXACTLY_{acc.process_index}', flush=True)
