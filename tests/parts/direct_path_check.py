"""OptimWrapper's direct path against Accelerate's wrappers, on one Accelerator.

On the distributed types of ``scale_runner.optim.FAST_TYPES`` (no loss scaler, no accumulation
in Accelerate), ``update_params`` calls torch's ``loss.backward()``, ``optimizer.step()`` and
``optimizer.zero_grad()`` itself instead of ``Accelerator.backward``,
``AcceleratedOptimizer.step`` and ``AcceleratedOptimizer.zero_grad``. :func:`check` trains two
identical models a few steps on the given Accelerator, one through Accelerate's three wrappers
and one through ``OptimWrapper.update_params``, and asserts that the bypass loses nothing:

- the calls that reach torch are the same, in the same order, with the same arguments (defaults
  filled in): ``Tensor.backward`` on a bitwise-equal loss, and the inner optimizer's ``step`` and
  ``zero_grad``, each exactly once per step;
- Accelerate's wrappers change no state of their own (the wrapper's, the Accelerator's, the
  shared AcceleratorState / GradientState) while they run;
- weights and optimizer state end bit for bit equal.

So a new Accelerate release that makes a wrapper of such a type do more (scale the loss, step
differently or twice, keep per-step state) fails this check instead of being skipped silently.

Run under ``torch.distributed.run`` it checks that launch's Accelerator on every rank
(``python -m torch.distributed.run --nproc_per_node 2 direct_path_check.py OUT``: MULTI_CPU)
and writes ``OUT/ok_rank<r>.json``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import sys
from pathlib import Path

import torch

STEPS = 4
PLAIN = (int, float, bool, str, bytes, type(None))


def _models(accelerator):
    """Two identically initialised (model, AdamW) pairs, each prepared by ``accelerator``."""
    pairs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        pairs.append(accelerator.prepare(model, opt))
    return pairs


def _batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def _loss(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x).float(), y)


def _arguments(fn, obj, args, kwargs) -> dict:
    """A call's arguments by name, defaults filled in (``zero_grad()`` == ``zero_grad(True)``)."""
    bound = inspect.signature(fn).bind(obj, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(inspect.signature(fn).parameters)))  # self
    return out


@contextlib.contextmanager
def recording(raw: torch.optim.Optimizer, events: list):
    """Record every ``Tensor.backward`` call and every call of ``raw.step`` / ``raw.zero_grad``
    (the torch optimizer inside Accelerate's wrapper) into ``events``, then run them."""
    backward = torch.Tensor.backward

    def record_backward(tensor, *args, **kwargs):
        events.append(('backward', tensor.detach().clone(), _arguments(backward, tensor, args, kwargs)))
        return backward(tensor, *args, **kwargs)

    def recorder(name):
        fn = getattr(type(raw), name)
        bound = getattr(raw, name)

        def record(*args, **kwargs):
            events.append((name, None, _arguments(fn, raw, args, kwargs)))
            return bound(*args, **kwargs)
        return record

    torch.Tensor.backward = record_backward
    raw.step, raw.zero_grad = recorder('step'), recorder('zero_grad')
    try:
        yield
    finally:
        torch.Tensor.backward = backward
        del raw.step, raw.zero_grad


def _snapshot(objects: dict) -> dict:
    """Attribute values of Accelerate's objects, one level deep (containers copied)."""
    out = {}
    for name, obj in objects.items():
        attrs = obj if isinstance(obj, dict) else vars(obj)
        for key, value in attrs.items():
            if isinstance(value, (dict, list, set)):
                value = type(value)(value)
            out[f'{name}.{key}'] = value
    return out


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, PLAIN) and isinstance(b, PLAIN):
        return a == b
    if isinstance(a, (dict, list, set)) and type(a) is type(b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
        return a == b
    return False


def _state_changes(before: dict, after: dict) -> list[str]:
    keys = set(before) | set(after)
    return sorted(k for k in keys if k not in before or k not in after or not _same(before[k], after[k]))


def check(accelerator, steps: int = STEPS) -> dict:
    """Assert the direct path does what Accelerate's wrappers do on ``accelerator``; returns a
    summary. Fails before training if the configuration does not take the direct path."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState, GradientState, PartialState

    from scale_runner.model import unwrap
    from scale_runner.optim import FAST_TYPES, OptimWrapper

    kind = str(accelerator.distributed_type).split('.')[-1]
    assert kind in FAST_TYPES, f'{kind} is not a direct-path type'
    (model_a, opt_a), (model_b, opt_b) = _models(accelerator)
    assert isinstance(opt_a, AcceleratedOptimizer) and isinstance(opt_b, AcceleratedOptimizer)
    wrapper = OptimWrapper(opt_b)
    wrapper.bind(accelerator, model_b)
    assert wrapper._direct is opt_b.optimizer, (
        f'{kind}, mixed_precision={accelerator.mixed_precision}: update_params does not take the '
        f'direct path (scaler={accelerator.scaler}, '
        f'gradient_accumulation_steps={accelerator.gradient_accumulation_steps})')
    assert accelerator.sync_gradients  # what AcceleratedOptimizer gates step/zero_grad on
    rank = accelerator.process_index
    watched = {'optimizer': opt_a, 'accelerator': accelerator,
               'AcceleratorState': AcceleratorState._shared_state,
               'PartialState': PartialState._shared_state,
               'GradientState': GradientState._shared_state}

    for step in range(steps):
        batch = _batch(step, rank)
        via_accelerate, direct = [], []
        loss = _loss(model_a, batch)
        before = _snapshot(watched)
        with recording(opt_a.optimizer, via_accelerate):
            accelerator.backward(loss)
            opt_a.step()
            opt_a.zero_grad()
        changed = _state_changes(before, _snapshot(watched))
        assert not changed, f'{kind}: Accelerate\'s wrappers changed {changed} in a step'

        with wrapper.optim_context(model_b):
            loss = _loss(model_b, batch)
        with recording(opt_b.optimizer, direct):
            wrapper.update_params(loss)

        names = [e[0] for e in via_accelerate]
        assert names == ['backward', 'step', 'zero_grad'], (
            f'{kind}: Accelerate\'s backward/step/zero_grad made the calls {names} into torch; the '
            f'direct path makes backward, step, zero_grad')
        assert [e[0] for e in direct] == names, [e[0] for e in direct]
        for (name, value_a, args_a), (_, value_b, args_b) in zip(via_accelerate, direct):
            assert args_a == args_b, f'{kind}: {name} called with {args_a} by Accelerate, {args_b} directly'
            if value_a is not None:
                assert value_a.dtype == value_b.dtype and torch.equal(value_a, value_b), (
                    f'{kind}: Accelerator.backward backpropagated {value_a}, not the loss {value_b}')
        assert wrapper.update_count == step + 1 and wrapper.train_state.stepped

    for (name, a), b in zip(unwrap(model_a).named_parameters(), unwrap(model_b).parameters()):
        assert torch.equal(a, b), f'{kind}: weight {name} differs after {steps} steps'
        assert a.grad is None and b.grad is None, name  # zero_grad(set_to_none=True) on both
    state_a, state_b = opt_a.state_dict(), opt_b.state_dict()
    assert state_a['param_groups'] == state_b['param_groups']
    assert state_a['state'].keys() == state_b['state'].keys() and state_a['state']
    for i, sa in state_a['state'].items():
        sb = state_b['state'][i]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), (i, key)
    return {'type': kind, 'mixed_precision': accelerator.mixed_precision, 'rank': rank,
            'processes': accelerator.num_processes, 'steps': steps}


def main(out: str) -> None:
    from accelerate import Accelerator
    from scale_runner.shutdown import register_drain
    accelerator = Accelerator(cpu=True)
    register_drain()  # what Runner does: no abort at interpreter exit (scale_runner.shutdown)
    summary = check(accelerator)
    Path(out, f'ok_rank{accelerator.process_index}.json').write_text(json.dumps(summary))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main(sys.argv[1])
