"""DeepSpeed ZeRO on the CPU over gloo (issue 18): exact, pickle-free resume; full fp32 weights.

Real DeepSpeed engines in real launches (``torch.distributed.run``, 2 processes): a run
SIGKILLed between two checkpoints and resumed ends bit-identical to one never stopped (the
weights, every rank's ZeRO partition and the counters); each rank's partition is in
safetensors + JSON; ``scale-runner export`` reads the full fp32 weights with DeepSpeed blocked.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARTS_DIR, pythonpath

CFG = PARTS_DIR / 'ds_cfg.py'


def _train(work: Path, processes: int, *options: str, kill: str | None = None,
           expect: int = 0) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT')}
    env.update(OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath())
    if kill:
        env['SR_KILL'] = kill
    launcher = ([sys.executable, '-m', 'torch.distributed.run', '--standalone',
                 '--nproc_per_node', str(processes)] if processes else [sys.executable])
    cmd = [*launcher, '-m', 'scale_runner', 'train', str(CFG), '--work-dir', str(work),
           '--cfg-options', *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=work.parent, env=env)
    out = proc.stdout + proc.stderr
    if expect == 0:
        assert proc.returncode == 0, out[-5000:]
    else:
        assert proc.returncode != 0, out[-5000:]
    return out


def _same_checkpoint(a: Path, b: Path, world: int) -> None:
    """Weights, every rank's ZeRO partition and the training state equal, bit for bit.

    ZeRO-3's flat fp32 partition of the last rank ends in padding that is never a weight and
    starts as uninitialized memory (it differs between two processes from the start): only
    the elements that are weights are compared there."""
    weights = load_file(a / 'model.safetensors')
    assert weights.keys() == load_file(b / 'model.safetensors').keys()
    assert all(torch.equal(v, load_file(b / 'model.safetensors')[k]) for k, v in weights.items())
    total = sum(v.numel() for v in weights.values())
    for r in range(world):
        name = f'zero_{r}.safetensors'
        x, y = load_file(a / name), load_file(b / name)
        assert x.keys() == y.keys(), name
        for k in x:
            if k.startswith('optimizer.fp32_flat_groups.'):
                n = x[k].numel()
                real = max(0, min(n, total - r * n))
                x[k], y[k] = x[k][:real], y[k][:real]
            assert torch.equal(x[k], y[k]), (name, k)
    for name in ['state.safetensors']:
        x, y = load_file(a / name), load_file(b / name)
        assert all(torch.equal(x[k], y[k]) for k in x), name
    sa, sb = (json.loads((p / 'state.json').read_text()) for p in (a, b))
    for part in ('train_state', 'optim_wrapper', 'param_schedulers.0'):
        assert sa[part] == sb[part], part
    for r in range(world):
        za, zb = (json.loads((p / f'zero_{r}.json').read_text()) for p in (a, b))
        assert za == zb


def _no_pickle(ckpt: Path) -> None:
    """Every file is JSON or safetensors (no pickle, no zip)."""
    for path in ckpt.rglob('*'):
        if path.is_file():
            data = path.read_bytes()
            assert not data.startswith((b'\x80', b'PK')), path
            if path.suffix == '.json':
                json.loads(data)
            else:
                assert path.suffix == '.safetensors', path
                load_file(path)


def _options(stage: str, precision: str, counts: str) -> tuple:
    return (f'accelerator.deepspeed.zero_optimization.stage={stage}',
            f'accelerator.mixed_precision={precision}', f'optim_wrapper.accumulative_counts={counts}',
            'default_hooks.checkpoint.interval=2')


@pytest.fixture(scope='module')
def zero2(tmp_path_factory) -> Path:
    """A ZeRO-2 fp32 run of 6 iterations on 2 processes, checkpoints every 2."""
    work = tmp_path_factory.mktemp('zero2') / 'straight'
    work.mkdir()
    out = _train(work, 2, *_options('2', 'no', '1'))
    assert 'DistributedType.DEEPSPEED, processes: 2' in out, out[-3000:]
    return work


def _kill_and_resume(tmp_path: Path, straight: Path, options: tuple) -> Path:
    """Both ranks SIGKILLed at iteration 5 (the last checkpoint is iteration 4), then
    ``--resume``: the final checkpoint equals the one of the run never stopped."""
    killed = tmp_path / 'killed'
    killed.mkdir()
    _train(killed, 2, *options, kill='iter:5', expect=-signal.SIGKILL)
    assert not (killed / 'checkpoints' / 'iter_6').exists()
    out = _train(killed, 2, *options, 'resume=True')
    assert 'resumed from' in out and 'iter 4' in out, out[-3000:]
    got = killed / 'checkpoints' / 'iter_6'
    _same_checkpoint(straight / 'checkpoints' / 'iter_6', got, 2)
    _no_pickle(got)
    weights = load_file(got / 'model.safetensors')  # fp32 master weights, from both partitions
    assert {v.dtype for v in weights.values()} == {torch.float32}
    assert sorted(weights) == ['net.0.bias', 'net.0.weight', 'net.2.bias', 'net.2.weight']
    return got


def test_zero2_run_sigkilled_between_checkpoints_resumes_bit_identically(zero2, tmp_path):
    _kill_and_resume(tmp_path, zero2, _options('2', 'no', '1'))


@pytest.mark.slow  # 66 s on 2 cores; the default suite keeps the ZeRO-2 SIGKILL resume
def test_zero3_bf16_accumulating_run_resumes_bit_identically_and_exports_fp32(tmp_path):
    """ZeRO-3 in bf16 with accumulative_counts=2 (the kill falls inside a window; the
    checkpoint it resumes from is at a window's end). Its weights are the fp32 master copy
    (more precision than bf16), exported in a process where DeepSpeed cannot be imported; a
    DDP run refuses to resume from it, saying what to do, and starts from it with load_from."""
    options = _options('3', 'bf16', '2')
    straight = tmp_path / 'straight'
    straight.mkdir()
    _train(straight, 2, *options)
    got = _kill_and_resume(tmp_path, straight, options)
    weights = load_file(got / 'model.safetensors')
    assert any(not torch.equal(v, v.bfloat16().float()) for v in weights.values())
    out = tmp_path / 'full.safetensors'
    code = ('import sys; sys.modules["deepspeed"] = None; from scale_runner.cli import entry; '
            f'sys.argv = ["scale-runner", "export", {str(got)!r}, {str(out)!r}]; entry()')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=pythonpath()))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    full = load_file(out)
    assert full.keys() == weights.keys() and all(torch.equal(full[k], weights[k]) for k in full)
    ddp = tmp_path / 'ddp'
    ddp.mkdir()
    out = _train(ddp, 0, 'accelerator.deepspeed=None', f'resume={got}', 'train_cfg.max_iters=7',
                 'optim_wrapper.accumulative_counts=2', expect=1)
    assert 'saved under DeepSpeed ZeRO-3' in out and 'load_from=' in out, out[-3000:]
    out = _train(ddp, 0, 'accelerator.deepspeed=None', f'load_from={got}', 'train_cfg.max_iters=1')
    assert f'loaded weights from {got}' in out, out[-3000:]


def test_zero_resume_on_another_number_of_processes_is_refused(zero2, tmp_path):
    """ZeRO partitions are laid out for the saved number of processes: 2 -> 1 is refused with
    an error naming the change and load_from; nothing is written."""
    work = tmp_path / 'work'
    shutil.copytree(zero2, work)
    out = _train(work, 0, 'resume=True', 'train_cfg.max_iters=8', expect=1)
    assert '2 -> 1 processes' in out and 'is not supported' in out and 'load_from=' in out, out[-3000:]
    assert sorted(p.name for p in (work / 'checkpoints').iterdir() if p.name.startswith('iter_')) == [
        'iter_2', 'iter_4', 'iter_6']


MATRIX = [(stage, precision, counts) for stage in '123' for precision in ('no', 'bf16')
          for counts in '12']


@pytest.mark.slow
@pytest.mark.parametrize('stage, precision, counts', MATRIX,
                         ids=[f'zero{s}-{p}-acc{c}' for s, p, c in MATRIX])
def test_every_zero_stage_and_precision_resumes_bit_identically(tmp_path, stage, precision, counts):
    options = _options(stage, precision, counts)
    straight = tmp_path / 'straight'
    straight.mkdir()
    _train(straight, 2, *options)
    _kill_and_resume(tmp_path, straight, options)


@pytest.mark.slow  # 29 s on 2 cores
def test_a_checkpoint_inside_a_zero_accumulation_window_is_refused(zero2, tmp_path):
    """DeepSpeed keeps a window's partial gradients in its own buckets (not saved): resuming
    from a checkpoint inside a window says so and names the way out."""
    work = tmp_path / 'work'
    work.mkdir()
    _train(work, 2, *_options('2', 'no', '2'), 'train_cfg.max_iters=3',
           'default_hooks.checkpoint.interval=1')
    state = json.loads((work / 'checkpoints' / 'iter_3' / 'state.json').read_text())
    assert state['meta']['zero_inside_window'] is True
    out = _train(work, 2, *_options('2', 'no', '2'), 'resume=True', expect=1)
    assert 'inside a gradient-accumulation window' in out and 'window boundary' in out, out[-3000:]


def test_fp16_deepspeed_on_a_cpu_is_a_config_error():
    """Refused before the process environment is touched (no launcher variables are set)."""
    from scale_runner.env import build_accelerator
    from scale_runner.errors import ConfigError
    before = dict(os.environ)
    with pytest.raises(ConfigError, match="mixed_precision='fp16'.*bf16"):
        build_accelerator(dict(deepspeed=dict(zero_optimization=dict(stage=2)), mixed_precision='fp16'))
    assert dict(os.environ) == before


def test_zero_state_codec_refuses_classes_outside_its_allow_list():
    """The ZeRO state's objects (loss scaler, stage enum, tuples, dtypes) round-trip; any other
    class is refused when saved and when read (a planted name builds nothing)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from scale_runner.checkpoint import CheckpointError
    from scale_runner.checkpoint.zero import _allowed, decode, encode
    allowed = _allowed()
    scaler = DynamicLossScaler(init_scale=2.0**16, scale_window=100, min_scale=1, delayed_shift=2,
                               consecutive_hysteresis=False, raise_error_at_min_scale=True,
                               dtype=torch.float16)
    state = {'loss_scaler': scaler, 'zero_stage': ZeroStageEnum.weights, 'betas': (0.9, 0.99),
             'moments': [torch.arange(3.0)]}
    doc = json.loads(json.dumps(encode(state, allowed), default=lambda t: t.tolist()))
    doc['moments'] = [torch.tensor(doc['moments'][0])]
    back = decode(doc, allowed)
    assert type(back['loss_scaler']) is DynamicLossScaler and vars(back['loss_scaler']) == vars(scaler)
    assert back['zero_stage'] is ZeroStageEnum.weights and back['betas'] == (0.9, 0.99)
    with pytest.raises(CheckpointError, match='subprocess.Popen'):
        encode({'x': subprocess.Popen.__new__(subprocess.Popen)}, allowed)
    with pytest.raises(CheckpointError, match="'Popen' is not one"):
        decode({'x': {'__object__': 'Popen', 'attrs': {'args': 'touch /tmp/x'}}}, allowed)


def test_ema_under_zero2_averages_the_weights_and_half_precision_is_refused(tmp_path):
    """One process (no launcher). ZeRO-2 in fp32: the average in each checkpoint is the EMA of
    the weights checkpointed after every update (momentum 0.5, the first update copies).
    In bf16 the module's weights are bf16 copies, where an average would not move: refused."""
    work = tmp_path / 'fp32'
    work.mkdir()
    _train(work, 0, "custom_hooks=[dict(type='EMAHook', momentum=0.5)]", 'train_cfg.max_iters=3')
    ckpts = work / 'checkpoints'
    weights = [load_file(ckpts / f'iter_{i}' / 'model.safetensors') for i in (1, 2, 3)]
    ema = dict(weights[0])
    for w in weights[1:]:
        ema = {k: v + 0.5 * (w[k] - v) for k, v in ema.items()}
    saved = load_file(ckpts / 'iter_3' / 'state.safetensors')
    for k, v in ema.items():
        assert torch.allclose(saved[f'hooks.EMAHook.ema.{k}'], v, rtol=0, atol=1e-6), k
    assert not torch.equal(saved['hooks.EMAHook.ema.net.0.weight'], weights[2]['net.0.weight'])
    half = tmp_path / 'bf16'
    half.mkdir()
    out = _train(half, 0, "custom_hooks=[dict(type='EMAHook')]", 'accelerator.mixed_precision=bf16',
                 'train_cfg.max_iters=2', expect=1)
    expected = "EMAHook under DeepSpeed in torch.bfloat16 (accelerator.mixed_precision='bf16')"
    assert expected in out, out[-3000:]
    assert not (half / 'checkpoints').exists() or not any((half / 'checkpoints').iterdir())


@pytest.mark.slow
def test_ema_under_zero3_is_refused(tmp_path):
    out = _train(tmp_path, 0, "custom_hooks=[dict(type='EMAHook')]",
                 'accelerator.deepspeed.zero_optimization.stage=3', 'train_cfg.max_iters=2', expect=1)
    expected = 'EMAHook under DeepSpeed ZeRO-3 (accelerator.deepspeed.zero_optimization.stage=3)'
    assert expected in out, out[-3000:]
