"""FSDP2-sharded models and optimizers in checkpoints: real ``fully_shard`` over 2 gloo ranks.

Accelerate runs FSDP only on GPUs (``bench/gpu_check.sh`` covers that path end to end); on the
CPU the same DTensor parameters and optimizer moments come from ``fully_shard`` directly.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

JOB = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from accelerate import Accelerator
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    from types import SimpleNamespace

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
''')


def test_fsdp2_checkpoint_holds_full_tensors_and_resumes_exactly(tmp_path):
    """Saving gathers the DTensor weights and AdamW moments into full tensors (DTensors have
    no storage to write); loading shards them back, and training continues bit for bit.
    EMAHook, which cannot average shards yet, refuses them up front."""
    (tmp_path / 'job.py').write_text(JOB)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'ACCELERATE_USE_CPU'):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '2', str(tmp_path / 'job.py'), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert 'RESUMED_EXACTLY_0' in out and 'RESUMED_EXACTLY_1' in out, out
    from safetensors.torch import load_file
    model = load_file(tmp_path / 'ckpt' / 'model.safetensors')
    assert model['0.weight'].shape == (16, 8)  # the full tensor, not rank 0's shard
