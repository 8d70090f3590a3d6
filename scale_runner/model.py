"""The model contract: MMEngine's ``BaseModel`` and adapters that train any ``nn.Module``."""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn

from .errors import ModelOutputError


NO_CONTEXT = contextlib.nullcontext()  # stateless and reentrant: one serves every step


def run_forward(module: nn.Module, data: Any, **kwargs) -> Any:
    """Call ``module`` on a batch: a dict as ``module(**data)``, a list/tuple as ``module(*data)``."""
    if isinstance(data, dict):
        return module(**data, **kwargs)
    if isinstance(data, (list, tuple)):
        return module(*data, **kwargs)
    return module(data, **kwargs)


def parse_losses(outputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return ``(loss, log_vars)`` from a tensor, a dict of losses or an object with ``.loss``.

    In a dict every key containing ``'loss'`` is summed (a list of tensors is summed first);
    the other tensor entries are logged as they are.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs, {'loss': outputs.detach()}
    if isinstance(outputs, dict) or hasattr(outputs, 'keys'):
        log_vars, total = {}, None
        for key, value in outputs.items():
            if isinstance(value, (list, tuple)):
                value = sum(v.mean() for v in value)
            if 'loss' in key:
                if isinstance(value, torch.Tensor) and value.numel() != 1:
                    value = value.mean()  # a per-sample loss (MMEngine averages it)
                total = value if total is None else total + value
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                log_vars[key] = value.detach()
        if total is None:
            raise ModelOutputError(
                f'model: the model returned a dict with keys {list(outputs.keys())} but none '
                f"contains 'loss', so there is nothing to train on; return a loss tensor or a dict "
                f"with a 'loss' key (in training mode, e.g. when the labels are given)")
        # The total is always logged as 'loss' (as in MMEngine), also for a single 'loss_x' key.
        log_vars['loss'] = total.detach() if isinstance(total, torch.Tensor) else total
        return total, log_vars
    loss = getattr(outputs, 'loss', None)
    if isinstance(loss, torch.Tensor):
        return loss, {'loss': loss.detach()}
    raise ModelOutputError(
        f'model: cannot find a loss in the model output of type {type(outputs).__name__}: '
        f"return a tensor, a dict with 'loss' keys, or an object with a .loss attribute")


# Wrapper classes (by name, so none of their modules is imported) and where the inner module is.
WRAPPERS = {'DistributedDataParallel': 'module', 'DataParallel': 'module',
            'FullyShardedDataParallel': 'module', 'DeepSpeedEngine': 'module',
            'OptimizedModule': '_orig_mod'}


def unwrap(module: nn.Module) -> nn.Module:
    """The user's module inside DDP / FSDP / DeepSpeed / torch.compile wrappers."""
    # By class name and the registered submodule: a user's own submodule named 'module' is
    # never mistaken for a wrapper, and no failing nn.Module.__getattr__ runs per step.
    attr = WRAPPERS.get(type(module).__name__)
    while attr is not None:
        inner = module._modules.get(attr)
        if inner is None:
            return module
        module = inner
        attr = WRAPPERS.get(type(module).__name__)
    return module


class BaseModel(nn.Module):
    """MMEngine's model contract: ``forward(inputs, data_samples=None, mode=...)``.

    ``mode='loss'`` returns a loss tensor or a dict of losses, ``'predict'`` predictions for the
    evaluator, ``'tensor'`` raw outputs. Override ``train_step``/``val_step``/``test_step`` for
    anything unusual (GANs, several optimizers: an ``OptimWrapperDict``).

    ``data_preprocessor`` (MMEngine's): a module or config (``dict(type='ImgDataPreprocessor',
    mean=..., std=...)``; default ``BaseDataPreprocessor``, which moves the batch to the model's
    device) that every step applies to the batch first, ``self.data_preprocessor(data,
    training)``. ``parse_losses(losses) -> (loss, log_vars)`` sums the ``loss`` entries.
    ``init_cfg`` is kept for MMEngine configs (weights are initialized by the modules).
    """

    def __init__(self, data_preprocessor: Any = None, init_cfg: Any = None):
        super().__init__()
        from .data_preprocessor import build_data_preprocessor
        self.data_preprocessor = build_data_preprocessor(data_preprocessor)
        self.init_cfg = init_cfg

    def forward(self, inputs, data_samples=None, mode: str = 'tensor'):  # pragma: no cover
        raise NotImplementedError

    def _preprocess(self, data, training: bool):
        # _modules, not the attribute: a subclass that skipped BaseModel.__init__ has none, and
        # nn.Module's failing __getattr__ would cost an exception every step
        pre = self._modules.get('data_preprocessor')
        return data if pre is None else pre(data, training)

    def parse_losses(self, losses: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total loss, log_vars)``: the sum of every entry whose key contains ``loss``."""
        return parse_losses(losses)

    def _run_forward(self, data, mode: str):
        return run_forward(self, data, mode=mode)

    def train_step(self, data, optim_wrapper) -> dict:
        # Forward through the prepared (e.g. DDP) model so gradients are synchronized.
        with optim_wrapper.optim_context(self):
            data = self._preprocess(data, True)
            losses = run_forward(optim_wrapper.model or self, data, mode='loss')
        loss, log_vars = self.parse_losses(losses)
        optim_wrapper.update_params(loss)
        return log_vars

    def val_step(self, data) -> Any:
        return run_forward(self, self._preprocess(data, False), mode='predict')

    def test_step(self, data) -> Any:
        return run_forward(self, self._preprocess(data, False), mode='predict')


def cast_inputs_to_weights(model: nn.Module) -> None:
    """Cast the floating-point tensors of every forward call's arguments to the dtype of the
    module's weights, when those are bf16/fp16 (DeepSpeed's half-precision engine converts the
    weights but, unlike autocast, passes inputs through as they come: float32 inputs then fail
    with 'mat1 and mat2 must have the same dtype'). MMEngine's data preprocessors do this cast."""
    core = unwrap(model)
    dtype = next((p.dtype for p in core.parameters() if p.is_floating_point()), None)
    if dtype in (torch.bfloat16, torch.float16):
        core.register_forward_pre_hook(functools.partial(_cast_call, dtype=dtype), with_kwargs=True)


def _cast_call(module, args, kwargs, dtype):
    return _cast(args, dtype), _cast(kwargs, dtype)


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, '_fields'):  # a namedtuple
        return type(obj)(*(_cast(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(v, dtype) for v in obj)
    return obj


def train_step(model: nn.Module, data: Any, optim_wrapper) -> dict:
    """One training step of ``model`` (as prepared), whatever kind of module it is."""
    return train_step_of(model)(data, optim_wrapper)


def train_step_of(model: nn.Module):
    """``step(data, optim_wrapper) -> log_vars`` for ``model`` (as prepared): the user's module's
    ``train_step`` if it has one, else forward + :func:`parse_losses` + ``update_params``.
    Loops resolve it once, not every step."""
    core = unwrap(model)
    # Looked up on the class: on an nn.Module without it, hasattr would raise and catch an
    # AttributeError in Module.__getattr__.
    if hasattr(type(core), 'train_step'):
        return core.train_step
    return functools.partial(_module_train_step, model)


def _module_train_step(model: nn.Module, data: Any, optim_wrapper) -> dict:
    context = optim_wrapper.optim_context(model)
    if context is NO_CONTEXT:  # skips nullcontext's two Python calls on the per-step path
        outputs = run_forward(model, data)
    else:
        with context:
            outputs = run_forward(model, data)
    loss, log_vars = parse_losses(outputs)
    optim_wrapper.update_params(loss)
    return log_vars


def eval_step(model: nn.Module, data: Any, mode: str = 'val') -> Any:
    """One validation/test step: ``val_step``/``test_step`` if defined, else a forward call."""
    core = unwrap(model)
    step = getattr(core, f'{mode}_step', None)
    if step is not None:
        return step(data)
    return run_forward(model, data)
