"""Accelerate at scale: the accelerator section, precision, step numerics, real 2-process runs.

Multi-process tests start real processes (gloo on the CPU) through the launchers users use.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PARTS_DIR, PlainRegressor, RegressionData, pythonpath, run_cli

from scale_runner import Config, ConfigError, Runner
from scale_runner.env import accelerator_kwargs
from scale_runner.hooks import Hook

ROOT = Path(__file__).resolve().parents[1]
NO_HOOKS = dict(logger=None, timer=None, checkpoint=None)


def _ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}'
    return proc


def _scalars(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / 'scalars.jsonl').read_text().splitlines()]


# ---- the accelerator section -----------------------------------------------------------------
def test_accelerator_section_maps_onto_accelerate_objects():
    from accelerate import DataLoaderConfiguration
    from accelerate.utils import (DistributedDataParallelKwargs, FullyShardedDataParallelPlugin,
                                  InitProcessGroupKwargs)
    kw = accelerator_kwargs(dict(mixed_precision='bf16', cpu=True, find_unused_parameters=True,
                                 timeout=120, fsdp=dict(reshard_after_forward=False),
                                 dataloader_config=dict(even_batches=False, split_batches=True)))
    assert kw['mixed_precision'] == 'bf16' and kw['cpu'] is True
    assert isinstance(kw['dataloader_config'], DataLoaderConfiguration)
    assert kw['dataloader_config'].even_batches is False and kw['dataloader_config'].split_batches
    ddp, pg = kw['kwargs_handlers']
    assert isinstance(ddp, DistributedDataParallelKwargs) and ddp.find_unused_parameters
    assert isinstance(pg, InitProcessGroupKwargs) and pg.timeout.total_seconds() == 240  # 2 x the watchdog's
    assert isinstance(kw['fsdp_plugin'], FullyShardedDataParallelPlugin)
    assert kw['fsdp_plugin'].fsdp_version == 2  # FSDP2 by default
    ds = accelerator_kwargs(dict(deepspeed=dict(zero_optimization=dict(stage=2))), 4)['deepspeed_plugin']
    assert ds.zero_stage == 2 and ds.deepspeed_config['gradient_accumulation_steps'] == 4
    with pytest.raises(ConfigError, match='accumulative_counts'):
        accelerator_kwargs(dict(deepspeed=dict(gradient_accumulation_steps=2)), 4)
    with pytest.raises(ConfigError, match='accumulative_counts'):
        accelerator_kwargs(dict(gradient_accumulation_steps=2))
    with pytest.raises(ConfigError, match='mixed_precision'):
        accelerator_kwargs(dict(mixed_precison='bf16'))


@pytest.mark.parametrize('split_batches, expected', [(False, 8), (True, 4)])
def test_deepspeed_micro_batch_size_of_a_prepared_loader(split_batches, expected):
    """Accelerate's prepared loader batches in its batch sampler (``batch_size`` is None): the
    micro batch DeepSpeed's 'auto' needs is read there, per process (found on an H100: ZeRO-2
    refused a train_dataloader with batch_size=512)."""
    from accelerate.data_loader import prepare_data_loader
    from scale_runner.env import micro_batch_size
    loader = torch.utils.data.DataLoader(RegressionData(64), batch_size=8)
    prepared = prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False,
                                   split_batches=split_batches)
    assert prepared.batch_size is None
    assert micro_batch_size(prepared, 2) == expected
    assert micro_batch_size(loader, 2) == 8


class LossesSeen(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append(float(outputs['loss']))


@pytest.mark.parametrize('env, cfg, expected', [
    (None, None, 'no'),        # Accelerate's default
    ('bf16', None, 'bf16'),    # the launcher's environment (accelerate launch --mixed_precision)
    ('bf16', 'no', 'no'),      # the config wins over the launcher
    ('no', 'bf16', 'bf16'),
])
def test_mixed_precision_precedence(tmp_path, tiny_parts, monkeypatch, env, cfg, expected):
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    if env is not None:
        monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', env)
    seen = LossesSeen()
    runner = Runner(**tiny_parts(
        tmp_path, val_dataloader=None, val_cfg=None, val_evaluator=None, log_level='INFO',
        accelerator=None if cfg is None else dict(mixed_precision=cfg, cpu=True),
        train_cfg=dict(by_epoch=False, max_iters=3), default_hooks=dict(checkpoint=None),
        custom_hooks=[seen]))
    runner.train()
    runner.close()
    assert runner.accelerator.mixed_precision == expected
    log = (runner.log_dir / f'{runner.experiment_name}.log').read_text()
    assert f'precision: {expected}' in log and 'device: cpu' in log and 'processes: 1' in log
    assert len(seen.losses) == 3 and all(torch.isfinite(torch.tensor(seen.losses)))
    # bf16 (and fp32) use no grad scaler, so there is no skipped-steps counter either
    assert runner.accelerator.scaler is None and runner.optim_wrapper.scaler_skips is None


def test_bf16_autocasts_on_cpu(tmp_path, tiny_parts):
    dtypes = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = PlainRegressor()

        def forward(self, x, y):
            out = self.inner.linear(x)
            dtypes.append(out.dtype)
            return {'loss': torch.nn.functional.mse_loss(out.float(), y)}

    runner = Runner(**tiny_parts(tmp_path, model=Probe(), val_dataloader=None, val_cfg=None,
                                 val_evaluator=None, accelerator=dict(mixed_precision='bf16'),
                                 train_cfg=dict(by_epoch=False, max_iters=2), default_hooks=NO_HOOKS))
    runner.train()
    runner.close()
    assert dtypes == [torch.bfloat16] * 2  # the forward ran under CPU autocast
    assert next(runner.model.parameters()).dtype == torch.float32  # weights stay fp32


def test_cli_cfg_options_set_precision_and_device(tmp_path):
    config = str(ROOT / 'configs' / 'spiral_mlp.py')
    work = tmp_path / 'work'
    _ok(run_cli(['train', config, '--work-dir', str(work), '--cfg-options',
                 'accelerator.mixed_precision=bf16', 'accelerator.cpu=True', 'train_cfg.max_epochs=1',
                 'train_dataloader.dataset.size=256', 'val_dataloader.dataset.size=64',
                 'experiment_name=bf16', 'default_hooks.logger.interval=2'],
                env={'ACCELERATE_MIXED_PRECISION': 'no'}))
    log = (work / 'bf16' / 'bf16.log').read_text()
    assert 'precision: bf16' in log and 'device: cpu' in log, log[:2000]
    losses = [r['loss'] for r in _scalars(work / 'bf16') if 'loss' in r]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


# ---- numerics ----------------------------------------------------------------------------------
def test_logged_grad_norm_is_the_norm_before_clipping(tmp_path):
    """With accumulation: the norm of the whole window's gradient, before clipping."""
    data = RegressionData(16, seed=5)
    torch.manual_seed(0)
    model = PlainRegressor()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    runner = Runner(model=model, work_dir=str(tmp_path), log_level='WARNING',
                    train_dataloader=dict(dataset=data, batch_size=4),
                    train_cfg=dict(by_epoch=False, max_iters=2),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1), accumulative_counts=2,
                                       clip_grad=dict(max_norm=1e-3)),
                    default_hooks=dict(logger=dict(interval=1), checkpoint=None, timer=None))
    runner.train()
    runner.close()
    ref = PlainRegressor()
    ref.load_state_dict(init)
    for b in range(2):
        x, y = data.x[4 * b:4 * b + 4], data.y[4 * b:4 * b + 4]
        (torch.nn.functional.mse_loss(ref.linear(x), y) / 2).backward()
    expected = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    records = _scalars(runner.log_dir)
    assert [('grad_norm' in r) for r in records] == [False, True]  # no norm before the update
    assert records[1]['grad_norm'] == pytest.approx(expected, rel=1e-5)
    assert expected > 100 * 1e-3  # it really was clipped


def test_skipped_scaler_steps_are_counted_and_logged(tmp_path):
    """A real GradScaler (CPU) skips the step whose gradients are not finite; the wrapper counts
    it through ``accelerator.optimizer_step_was_skipped`` and the logger writes the total."""
    from accelerate import Accelerator
    data = RegressionData(16, seed=2)
    data.x[5, 0] = float('inf')  # batch 1 (samples 4..7) gives non-finite gradients
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8)
    weights = []

    class Weights(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            weights.append(runner.model.linear.weight.detach().clone())

    torch.manual_seed(0)
    model = PlainRegressor()
    w0 = model.linear.weight.detach().clone()
    runner = Runner(model=model, work_dir=str(tmp_path), log_level='WARNING', accelerator=accelerator,
                    train_dataloader=dict(dataset=data, batch_size=4),
                    train_cfg=dict(by_epoch=False, max_iters=4),
                    optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
                    # nan_guard off: the Inf loss must reach the scaler, which is what is tested
                    default_hooks=dict(logger=dict(interval=1), checkpoint=None, timer=None,
                                       nan_guard=None),
                    custom_hooks=[Weights()])
    runner.train()
    runner.close()
    assert runner.optim_wrapper.scaler_skips == 1 and runner.optim_wrapper.update_count == 4
    assert not torch.equal(weights[0], w0)
    assert torch.equal(weights[1], weights[0])  # the skipped step left the weights alone
    assert not torch.equal(weights[2], weights[1])
    assert torch.isfinite(weights[-1]).all()
    assert [r['scaler_skips'] for r in _scalars(runner.log_dir)] == [0, 1, 1, 1]
    assert accelerator.scaler.get_scale() == 2.0 ** 7  # backed off once


def test_grad_scaler_state_and_scaler_skips_survive_resume(tmp_path):
    """The fp16 loss scale, its growth tracker and the skipped-step count are checkpointed."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    data = RegressionData(16, seed=2)
    data.x[5, 0] = float('inf')

    def make(max_iters, resume, init_scale):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True)
        accelerator.scaler = torch.amp.GradScaler('cpu', init_scale=init_scale, growth_interval=2)
        return accelerator, Runner(
            model=PlainRegressor(), work_dir=str(tmp_path), log_level='WARNING',
            accelerator=accelerator, train_dataloader=dict(dataset=data, batch_size=4),
            train_cfg=dict(by_epoch=False, max_iters=max_iters), resume=resume,
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
            default_hooks=dict(checkpoint=dict(interval=3), nan_guard=None))

    acc, first = make(3, False, 2.0 ** 8)
    first.train()
    first.close()
    saved = acc.scaler.state_dict()
    assert first.optim_wrapper.scaler_skips == 1
    acc2, second = make(4, True, 2.0 ** 2)  # a fresh scaler would start from 4
    second.train()
    second.close()
    assert second.optim_wrapper.scaler_skips == 1  # restored, not restarted at 0
    # After one more finite step the growth tracker continues from the saved one.
    assert saved['_growth_tracker'] == 1 and acc2.scaler.state_dict()['scale'] == saved['scale'] * 2


# ---- real multi-process runs --------------------------------------------------------------------
DDP_CONFIG = PARTS_DIR / 'ddp_cfg.py'  # imports tests/parts/rank_dump.py (RankDump)


@pytest.fixture
def ddp_job(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'ACCELERATE_USE_CPU',
                'ACCELERATE_MIXED_PRECISION'):
        env.pop(var, None)
    return tmp_path, env


def _launch(cmd, env, cwd, timeout=150):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as e:  # a hang is a failure, not a stuck test suite
        pytest.fail(f'{cmd[:4]} did not finish in {timeout} s (hang?)\n{e.stdout}\n{e.stderr}')


def _accelerate(*args):
    return [sys.executable, '-m', 'accelerate.commands.launch', *args]


def _train_args(work, *options):
    return ['-m', 'scale_runner', 'train', str(DDP_CONFIG), '--work-dir', str(work),
            '--cfg-options', 'experiment_name=run', *options]


def _rank_results(work: Path, n: int):
    from safetensors.torch import load_file
    weights = [load_file(str(work / f'final_rank{r}.safetensors')) for r in range(n)]
    counters = [json.loads((work / f'counters_rank{r}.json').read_text()) for r in range(n)]
    return weights, counters


def test_two_processes_match_one_process_with_twice_the_batch(ddp_job):
    """cpu_ddp.yaml, 2 ranks x batch 8 == 1 rank x batch 16 on the same data order: weights,
    LR after every update, counters; only the main process writes logs and checkpoint metadata,
    every rank takes part in each checkpoint save."""
    tmp_path, env = ddp_job
    work = tmp_path / 'ddp'
    proc = _ok(_launch(_accelerate('--config_file', str(ROOT / 'launch' / 'cpu_ddp.yaml'),
                                   '--main_process_port', '0', *_train_args(work)),
                       env, tmp_path))
    single = tmp_path / 'single'  # the reference: one process (in this one), batch 16
    cfg = Config.fromfile(str(DDP_CONFIG))
    cfg.merge_from_dict({'work_dir': str(single), 'experiment_name': 'run', 'log_level': 'WARNING',
                         'train_dataloader.batch_size': 16})
    runner = Runner.from_cfg(cfg)
    runner.train()
    runner.close()
    (w0, w1), (c0, c1) = _rank_results(work, 2)
    (ws,), (cs,) = _rank_results(single, 1)
    for k in ws:
        assert torch.equal(w0[k], w1[k]), k
        assert torch.allclose(w0[k], ws[k], rtol=1e-4, atol=1e-6), (k, (w0[k] - ws[k]).abs().max())
    assert c0 == c1 == {**cs, 'processes': 2}
    assert c0['updates'] == c0['iter'] == 12 and c0['epoch'] == 2
    # LR after every update: the same as the single process (schedulers step once per update)
    lrs = [r['lr'] for r in _scalars(work / 'run') if 'loss' in r]
    assert lrs == pytest.approx([r['lr'] for r in _scalars(single / 'run') if 'loss' in r], rel=1e-9)
    assert len(lrs) == 12 and len(set(lrs)) > 6
    assert [r['step'] for r in _scalars(work / 'run') if 'loss' in r] == list(range(1, 13))
    log = (work / 'run' / 'run.log').read_text()
    assert 'MULTI_CPU, processes: 2, device: cpu' in log and 'precision: no' in log
    # main-process-only files; every rank in every save
    assert [p.relative_to(work).as_posix() for p in work.rglob('scalars.jsonl')] == ['run/scalars.jsonl']
    assert [p.relative_to(work).as_posix() for p in work.rglob('config.py')] == ['run/config.py']
    assert sorted(p.name for p in (work / 'run').glob('*.log')) == ['run.log', 'run.rank1.log']
    assert sorted(p.name for p in work.glob('saved_*')) == [
        'saved_iter12_rank0', 'saved_iter12_rank1', 'saved_iter6_rank0', 'saved_iter6_rank1']
    for name in ('epoch_1', 'epoch_2'):
        files = {p.name for p in (work / 'checkpoints' / name).iterdir()}
        assert {'manifest.json', 'model.safetensors', 'rng_0.safetensors', 'rng_1.safetensors'} <= files
    assert (work / 'checkpoints' / 'latest').read_text().strip() == 'epoch_2'
    assert 'Traceback' not in proc.stderr


def test_plain_torchrun_without_gpu_trains_as_two_real_ranks(ddp_job):
    """No ACCELERATE_USE_CPU: the runner must switch to gloo on the CPU (or stop), never train
    twice as two lone rank-0 processes."""
    tmp_path, env = ddp_job
    work = tmp_path / 'torchrun'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           *_train_args(work, 'train_cfg.max_epochs=1', 'default_hooks.checkpoint=None')]
    proc = _launch(cmd, env, tmp_path)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:  # the other allowed outcome: a clear stop, nothing trained
        assert 'Accelerate sees a single process' in out, out
        assert not list(work.rglob('final_rank*'))
        return
    assert 'processes: 2' in out, out
    (w0, w1), (c0, c1) = _rank_results(work, 2)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert c0 == c1 and c0['processes'] == 2
    assert c0['iter'] == 6  # 96 samples / (8 x 2 ranks); two lone ranks would each do 12
    assert len(list(work.rglob('scalars.jsonl'))) == 1


@pytest.mark.parametrize('size, even_batches, ok', [
    (33, False, False),  # 9 batches: 5 vs 4 -> refused on every rank, no hang
    pytest.param(37, False, True, marks=pytest.mark.slow),  # 5 per rank, last one short on rank 1
    pytest.param(37, True, True, marks=pytest.mark.slow),
    pytest.param(33, True, True, marks=pytest.mark.slow),  # padded to 10 batches
])
def test_uneven_data_does_not_hang(ddp_job, size, even_batches, ok):
    tmp_path, env = ddp_job
    work = tmp_path / 'uneven'
    env = dict(env, ACCELERATE_USE_CPU='1')
    cmd = _accelerate('--multi_gpu', '--num_processes', '2', '--num_machines', '1', '--mixed_precision',
                      'no', '--dynamo_backend', 'no', '--main_process_port', '0',
                      *_train_args(work, f'train_dataloader.dataset.size={size}',
                                   'train_dataloader.batch_size=4', 'train_cfg.max_epochs=1',
                                   'param_scheduler=None', 'default_hooks.checkpoint=None',
                                   f'accelerator.dataloader_config.even_batches={even_batches}'))
    proc = _launch(cmd, env, tmp_path, timeout=120)
    if not ok:
        assert proc.returncode != 0
        assert 'would step a different number of times' in proc.stderr, proc.stderr[-3000:]
        assert not list(work.rglob('final_rank*'))
        return
    _ok(proc)
    (w0, w1), (c0, c1) = _rank_results(work, 2)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert c0 == c1 and c0['iter'] == 5


def test_half_weights_get_inputs_of_their_dtype():
    """DeepSpeed bf16/fp16 converts the weights, not the inputs (found on an H100: ZeRO-2 bf16
    failed with 'mat1 and mat2 must have the same dtype'); the runner casts float inputs."""
    from collections import namedtuple
    from scale_runner.model import cast_inputs_to_weights
    model = PlainRegressor().to(torch.bfloat16)
    batch = dict(x=torch.randn(4, 4), y=torch.randn(4, 1))
    with pytest.raises(RuntimeError, match='dtype'):
        model(**batch)
    cast_inputs_to_weights(model)
    out = model(**batch)
    assert out['loss'].dtype == torch.bfloat16
    Pair = namedtuple('Pair', 'a b')
    cast = model._forward_pre_hooks[next(iter(model._forward_pre_hooks))]
    args, kwargs = cast(model, (Pair(torch.ones(1), torch.ones(1, dtype=torch.long)),), {'n': [torch.ones(1)]})
    assert args[0].a.dtype == torch.bfloat16 and args[0].b.dtype == torch.long
    assert isinstance(args[0], Pair) and kwargs['n'][0].dtype == torch.bfloat16
    fp32 = PlainRegressor()
    cast_inputs_to_weights(fp32)  # float32 weights: nothing to cast, no hook
    assert not fp32._forward_pre_hooks
