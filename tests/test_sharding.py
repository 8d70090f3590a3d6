"""FSDP2-sharded models and optimizers in checkpoints: real ``fully_shard`` over 2 gloo ranks.

This file drives the checkpoint writer and reader by hand on a model sharded with ``fully_shard``;
runs of the Runner with ``accelerator.fsdp`` (sharded by the runner on the CPU) and their
resume on 1, 2 and 3 ranks are in ``tests/test_elastic_resume.py``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import PARTS_DIR

JOB = PARTS_DIR / 'fsdp2_job.py'


def test_fsdp2_checkpoint_holds_each_ranks_shards_and_resumes_exactly(tmp_path):
    """Each rank writes its own shards (no gathering), as safetensors with DCP's offsets in
    the header; loading reads them back into the DTensors and training continues bit for bit."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'ACCELERATE_USE_CPU'):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '2', str(JOB), str(tmp_path)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert 'RESUMED_EXACTLY_0' in out and 'RESUMED_EXACTLY_1' in out, out
    from safetensors import safe_open
    ckpt = tmp_path / 'ckpt'
    assert not (ckpt / 'model.safetensors').exists()
    shards = sorted((ckpt / 'sharded').iterdir())
    assert [p.name for p in shards] == ['shard-00001-model-00001-of-00001.safetensors',
                                        'shard-00002-model-00001-of-00001.safetensors']
    manifest = json.loads((ckpt / 'manifest.json').read_text())
    assert {f'sharded/{p.name}' for p in shards} <= set(manifest['files'])
    rows = []
    for p in shards:
        with safe_open(p, framework='pt') as f:  # a real safetensors file, not a pickle
            assert 'DCP_SHARDING_INFO' in f.metadata()
            rows.append(f.get_slice('model.0.weight').get_shape()[0])
    assert rows == [8, 8]  # half of the (16, 8) weight on each rank: shards, not the full tensor
