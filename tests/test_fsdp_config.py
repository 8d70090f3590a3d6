"""``accelerator.fsdp`` on the CPU: FSDP2 (never a silent DDP), unsharded with a log line on
one process, a clear error for what the CPU cannot honour.

Accelerate drops the FSDP plugin on the CPU and builds DDP; the runner shards the model there
itself with Accelerate's FSDP2 preparation (scale_runner/fsdp.py). The 2-process runs are
real: ``torch.distributed.run`` over gloo, checked against the same training unsharded.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import PARTS_DIR, PlainRegressor, pythonpath

from scale_runner import ConfigError, Runner
from scale_runner.env import build_accelerator

JOB = PARTS_DIR / 'fsdp_cfg_job.py'


def _run_job(tmp_path, accelerator: dict) -> tuple[list[dict], str]:
    """The job's per-rank results and rank 0's log."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
                'ACCELERATE_USE_CPU', 'ACCELERATE_USE_FSDP'):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                           '--nproc_per_node', '2', str(JOB), str(tmp_path),
                           json.dumps(accelerator)],
                          capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    results = [json.loads((tmp_path / f'result_rank{r}.json').read_text()) for r in (0, 1)]
    return results, (tmp_path / 'run' / 'run.log').read_text()


def _assert_fsdp2(results: list[dict]) -> None:
    for r in results:
        assert r['distributed_type'] == 'DistributedType.MULTI_CPU', r
        assert r['model_type'] == 'FSDPMLPClassifier' and r['fsdp_module'], r  # not DDP
        assert r['all_dtensor'] and r['local_rows'] == [8], r  # 16 rows of layer 0, halved
        assert r['optimizer_type'] == 'AcceleratedOptimizer', r  # prepared by Accelerate
        assert r['optimizer_over_model_params'], r  # the sharded parameters, not the old ones
        assert r['iters'] == r['updates'] == 6, r
        assert r['weights_changed'] and r['same_on_every_rank'], r
        assert r['loss_after'] < r['loss_before'], r


def test_fsdp2_on_cpu_trains_like_unsharded(tmp_path):
    """Two CPU ranks: every Linear is its own fully_shard unit (the plugin's transformer wrap
    policy), and the trained weights equal the same training in one unsharded process."""
    results, log = _run_job(tmp_path, dict(fsdp=dict(
        auto_wrap_policy='transformer_based_wrap', transformer_cls_names_to_wrap=['Linear'])))
    _assert_fsdp2(results)
    assert all(r['matches_unsharded'] and r['compute_dtype'] == 'torch.float32' for r in results)
    assert ('FSDP2 on cpu (gloo, 2 processes): fully_shard applied by scale_runner to 3 '
            'modules + root') in log, log


def test_fsdp2_on_cpu_with_bf16_and_activation_checkpointing(tmp_path):
    """The plugin's size-based policy, activation checkpointing, reshard_after_forward and
    accelerator.mixed_precision (a bf16 MixedPrecisionPolicy, as Accelerate sets on GPUs)."""
    results, log = _run_job(tmp_path, dict(mixed_precision='bf16', fsdp=dict(
        auto_wrap_policy='size_based_wrap', min_num_params=100, activation_checkpointing=True,
        reshard_after_forward=False)))
    _assert_fsdp2(results)
    assert all(r['compute_dtype'] == 'torch.bfloat16' for r in results), results
    assert 'FSDP2 on cpu (gloo, 2 processes): fully_shard applied by scale_runner' in log, log


def test_fsdp_with_one_process_trains_unsharded_and_says_so(tmp_path, tiny_parts, monkeypatch):
    monkeypatch.delenv('ACCELERATE_USE_FSDP', raising=False)  # restored after the test
    runner = Runner(**tiny_parts(tmp_path, val_dataloader=None, val_cfg=None, val_evaluator=None,
                                 accelerator=dict(fsdp=dict()), log_level='INFO',
                                 train_cfg=dict(by_epoch=False, max_iters=2),
                                 default_hooks=dict(checkpoint=None)))
    before = runner.model.linear.weight.detach().clone()
    runner.train()
    runner.close()
    assert type(runner.model) is PlainRegressor
    assert not torch.equal(before, runner.model.linear.weight)
    log = (runner.log_dir / f'{runner.experiment_name}.log').read_text()
    assert ('accelerator.fsdp is set but this run has 1 process: nothing to shard, training '
            'unsharded') in log, log
    assert os.environ.get('ACCELERATE_USE_FSDP') is None  # Accelerate never saw the plugin


@pytest.mark.parametrize('cfg, match', [
    (dict(fsdp=dict(fsdp_version=1)), r'accelerator\.fsdp\.fsdp_version = 1 cannot run on the CPU'),
    (dict(fsdp=dict(cpu_offload=True)), r'accelerator\.fsdp\.cpu_offload = True .* remove it'),
    (dict(fsdp=dict(activation_checkpointing=True)),
     r'accelerator\.fsdp\.activation_checkpointing = True .* accelerator\.fsdp\.auto_wrap_policy'),
    (dict(fsdp=dict(), dynamo='eager'), r'accelerator\.dynamo .* with accelerator\.fsdp'),
])
def test_fsdp_settings_the_cpu_cannot_honour_are_refused(cfg, match):
    """Before the Accelerator (and its process group) exists; with one process too, so a
    config that passes a one-process check also runs on several."""
    with pytest.raises(ConfigError, match=match):
        build_accelerator(dict(cfg, cpu=True))
