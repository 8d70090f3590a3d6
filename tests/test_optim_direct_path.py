"""``OptimWrapper.update_params``' direct path against Accelerate's wrappers (issue 16).

One test per distributed type of ``FAST_TYPES`` this machine can run: ``NO`` in this process
(fp32, and CPU bf16/fp16, which have no loss scaler either) and ``MULTI_CPU`` in a real
2-process gloo launch. Each runs ``tests/parts/direct_path_check.check``: the same steps through
``Accelerator.backward`` / ``AcceleratedOptimizer.step`` / ``.zero_grad`` and through
``update_params``, with the same calls reaching torch, no Accelerate state changed by its
wrappers, and bit-identical weights and optimizer state. The other types of ``FAST_TYPES``
(``MULTI_GPU``, ``MULTI_NPU``, ...) need their hardware: run the check there with
``torch.distributed.run ... tests/parts/direct_path_check.py OUT`` (it uses ``cpu=True``; drop it
for a device run).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import PARTS_DIR, pythonpath
from direct_path_check import check

from scale_runner.optim import FAST_TYPES, OptimWrapper


@pytest.mark.parametrize('mixed_precision', ['no', 'bf16', 'fp16'])
def test_direct_path_does_what_accelerate_does_on_no(mixed_precision):
    from accelerate import Accelerator
    summary = check(Accelerator(cpu=True, mixed_precision=mixed_precision))
    assert summary['type'] == 'NO' and summary['processes'] == 1


def test_direct_path_does_what_accelerate_does_on_multi_cpu(tmp_path):
    """Two real ranks (gloo, DDP-wrapped models): MULTI_CPU as ``accelerate launch`` makes it."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
                'ACCELERATE_USE_CPU', 'ACCELERATE_MIXED_PRECISION'):
        env.pop(var, None)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           str(PARTS_DIR / 'direct_path_check.py'), str(tmp_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'the 2-process check did not finish in 150 s (hang?)\n{e.stdout}\n{e.stderr}')
    assert proc.returncode == 0, f'exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}'
    import json
    summaries = [json.loads((tmp_path / f'ok_rank{r}.json').read_text()) for r in range(2)]
    assert [(s['type'], s['rank'], s['processes']) for s in summaries] == [('MULTI_CPU', r, 2)
                                                                          for r in range(2)]


# ---- the check fails when an Accelerate wrapper does more than call torch ----------------------
def _step_twice(self, closure=None):
    self.optimizer.step(closure)
    self.optimizer.step(closure)


def _step_with_state(self, closure=None):
    self.optimizer.step(closure)
    self.steps_taken = getattr(self, 'steps_taken', 0) + 1


def _zero_grad_keeping_grads(self, set_to_none=None):
    self.optimizer.zero_grad(set_to_none=False)


def _backward_scaled(self, loss, **kwargs):
    (loss * 0.5).backward(**kwargs)


def _backward_touching_gradient_state(self, loss, **kwargs):
    self.gradient_state.plugin_kwargs = {'seen': True}
    loss.backward(**kwargs)


@pytest.mark.parametrize('target, name, fake, message', [
    ('accelerate.optimizer.AcceleratedOptimizer', 'step', _step_twice, 'made the calls'),
    ('accelerate.optimizer.AcceleratedOptimizer', 'step', _step_with_state, 'changed'),
    ('accelerate.optimizer.AcceleratedOptimizer', 'zero_grad', _zero_grad_keeping_grads, 'zero_grad called'),
    ('accelerate.Accelerator', 'backward', _backward_scaled, 'not the loss'),
    ('accelerate.Accelerator', 'backward', _backward_touching_gradient_state, 'changed'),
])
def test_the_check_catches_per_step_work_in_accelerates_wrappers(monkeypatch, target, name, fake,
                                                                  message):
    """What a future Accelerate release might add to a wrapped type: each is caught."""
    import importlib

    from accelerate import Accelerator
    module, cls = target.rsplit('.', 1)
    monkeypatch.setattr(getattr(importlib.import_module(module), cls), name, fake)
    with pytest.raises(AssertionError, match=message):
        check(Accelerator(cpu=True))


# ---- which configurations take the direct path ---------------------------------------------------
def _bound(wrapper_cls=OptimWrapper, **kwargs):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    wrapper = wrapper_cls(opt, **kwargs)
    wrapper.bind(accelerator, model)
    return wrapper


def test_direct_path_only_where_every_skipped_stage_is_a_no_op():
    assert 'NO' in FAST_TYPES and 'MULTI_CPU' in FAST_TYPES and 'DEEPSPEED' not in FAST_TYPES
    assert 'FSDP' not in FAST_TYPES and 'XLA' not in FAST_TYPES
    plain = _bound()
    assert plain._direct is plain.optimizer.optimizer
    assert _bound(accumulative_counts=2)._direct is None  # loss scaling and windows
    assert _bound(clip_grad=dict(max_norm=1.0))._direct is None
    for stage in ('scale_loss', 'backward', 'should_update', 'step', 'zero_grad'):
        def same(self, *args, _stage=stage, **kwargs):
            return getattr(OptimWrapper, _stage)(self, *args, **kwargs)
        sub = type(f'Own_{stage}', (OptimWrapper,), {stage: same})
        assert _bound(sub)._direct is None, stage  # an overridden stage is always called


def test_update_params_with_kwargs_takes_the_methods():
    wrapper = _bound()
    assert wrapper._direct is not None
    seen = []
    raw = wrapper._direct
    original = raw.zero_grad

    def zero_grad(set_to_none=True):
        seen.append(set_to_none)
        original(set_to_none=set_to_none)
    raw.zero_grad = zero_grad
    loss = wrapper.model(torch.ones(1, 2)).sum()
    wrapper.update_params(loss, zero_kwargs=dict(set_to_none=False))
    assert seen == [False] and wrapper.update_count == 1 and wrapper.train_state.stepped
