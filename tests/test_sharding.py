"""FSDP2-sharded models and optimizers in checkpoints: real ``fully_shard`` over 2 gloo ranks.

Accelerate runs FSDP only on GPUs (``bench/gpu_check.sh`` covers that path end to end); on the
CPU the same DTensor parameters and optimizer moments come from ``fully_shard`` directly.
"""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import PARTS_DIR

JOB = PARTS_DIR / 'fsdp2_job.py'


def test_fsdp2_checkpoint_holds_full_tensors_and_resumes_exactly(tmp_path):
    """Saving gathers the DTensor weights and AdamW moments into full tensors (DTensors have
    no storage to write); loading shards them back, and training continues bit for bit.
    EMAHook, which cannot average shards yet, refuses them up front."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'ACCELERATE_USE_CPU'):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '2', str(JOB), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert 'RESUMED_EXACTLY_0' in out and 'RESUMED_EXACTLY_1' in out, out
    from safetensors.torch import load_file
    model = load_file(tmp_path / 'ckpt' / 'model.safetensors')
    assert model['0.weight'].shape == (16, 8)  # the full tensor, not rank 0's shard
