"""``OptimWrapper``: backward, gradient accumulation, clipping and stepping on Accelerate."""
from __future__ import annotations

from typing import Any

import torch

from .checks import bad_value, check_number, check_optimizer_args, is_number
from .errors import ConfigError, did_you_mean
from .model import NO_CONTEXT
from .registry import OPTIM_WRAPPERS, OPTIMIZERS
from .state import TrainState


# Distributed types whose optimizer step/backward need nothing from Accelerate's wrappers (when
# there is no loss scaler and Accelerate accumulates nothing): AcceleratedOptimizer.step/zero_grad
# and Accelerator.backward only call torch's there. tests/test_optim_direct_path.py checks it for
# the types this machine can run ('NO', 'MULTI_CPU'), so an Accelerate release that adds per-step
# work to one of them fails a test instead of being skipped.
FAST_TYPES = frozenset({'NO', 'MULTI_CPU', 'MULTI_GPU', 'MULTI_NPU', 'MULTI_XPU', 'MULTI_MLU',
                        'MULTI_MUSA', 'MULTI_SDAA', 'MULTI_HPU'})
# The methods of update_params a subclass may override; the direct path needs them all as they are
# (not "stages": that word names hook points).
UPDATE_METHODS = ('scale_loss', 'backward', 'should_update', 'step', 'zero_grad')


@OPTIM_WRAPPERS.register_module()
class OptimWrapper:
    """Wraps an optimizer with MMEngine's ``update_params`` contract.

    Gradient accumulation has one source of truth, ``accumulative_counts``, counted on the
    run's one state object: the window of a micro-batch is ``state.iter`` (iterations done, see
    :class:`~scale_runner.state.TrainState`; the runner binds its state as ``train_state``) and
    the run's last, partial window ends at ``state.max_iters``, weighted like a full one. The
    wrapper decides which micro-batches update, skips the DDP all-reduce on the others
    (``accelerator.no_sync``) and sets Accelerate's ``sync_gradients`` to match, so clipping,
    scheduler steps and logging gate on the same flag; every update it makes is published once,
    as ``state.stepped`` (and counted in ``update_count``).

    Used without a runner, the wrapper keeps a state of its own and counts its
    ``update_params`` calls there (``initialize_count_status`` sets where it starts).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, accumulative_counts: int = 1,
                 clip_grad: dict | None = None):
        if not isinstance(accumulative_counts, int) or accumulative_counts < 1:
            raise ConfigError(f'optim_wrapper.accumulative_counts must be a positive int, '
                              f'got {accumulative_counts!r}')
        if clip_grad is not None:
            clip_grad = _check_clip_grad(clip_grad)
        self.optimizer = optimizer
        self.accumulative_counts = accumulative_counts
        self.clip_grad = clip_grad
        self.accelerator = None
        self.model = None  # the prepared model, set by bind()
        # The counters the window is read from: the runner's TrainState once it binds it here.
        self.train_state = self._own_state = TrainState()
        self.update_count = 0  # optimizer updates done (window ends, skipped ones included)
        self.grad_norm: float | None = None
        # Steps a loss scaler skipped (inf/nan gradients): an int while one can skip (fp16),
        # None otherwise (fp32, bf16: no scaler).
        self.scaler_skips: int | None = None
        self._engine_scales_loss = False
        self._raw = None  # the torch optimizer, when Accelerate's wrappers can be bypassed
        self._direct = None  # ... and when update_params may call it itself (set by bind)
        # Set by NanGuardHook: guard(loss) -> False drops this update (raises in 'raise' mode).
        self.loss_guard = None
        self.loss_clock = None  # IterTimerHook's stamp of the loss's arrival (several processes)
        self._drop_window = False  # a bad loss was seen in the current accumulation window
        self._last_loss = None  # the last loss backpropagated (see update_params)
        self._sharded = None  # the FSDP2-sharded module, whose optimizer state is gathered to save

    def bind(self, accelerator, model) -> None:
        """Attach the Accelerator and the prepared model (done by the runner after prepare)."""
        self.accelerator = accelerator
        self.model = model
        if model is not None:
            from .model import unwrap
            from .sharding import is_sharded
            module = unwrap(model)
            self._sharded = module if is_sharded(module) else None
        self._raw = None
        if accelerator is not None:
            if accelerator.mixed_precision == 'fp16' or accelerator.scaler is not None:
                self.scaler_skips = self.scaler_skips or 0
            # DeepSpeed's engine divides the loss by its gradient_accumulation_steps itself.
            self._engine_scales_loss = accelerator.distributed_type == 'DEEPSPEED'
            # Accelerate's backward/step/zero_grad do per-step work we do not need when there is
            # no loss scaler and no special engine (an uncached package lookup in backward and
            # step, inspect.signature in zero_grad, a loss division by 1): call torch directly.
            if (accelerator.scaler is None and accelerator.gradient_accumulation_steps == 1
                    and accelerator.distributed_type in FAST_TYPES):
                self._raw = getattr(self.optimizer, 'optimizer', self.optimizer)
        # update_params' direct path: one micro-batch per update (so no loss scaling and every
        # call steps), no clipping, no scaler, and none of its stages overridden by a subclass.
        cls = type(self)
        plain = all(getattr(cls, name) is getattr(OptimWrapper, name) for name in UPDATE_METHODS)
        self._direct = (self._raw if plain and self.accumulative_counts == 1
                        and self.clip_grad is None else None)

    # ---- accumulation: the window is read from the train state ----------------------------
    def initialize_count_status(self, model, init_counts: int, max_counts: int | None) -> None:
        """MMEngine's API: the iterations done and the run's length, where the window is read.

        On a wrapper of its own (no runner) this sets them. On a runner's wrapper they are the
        runner's ``state.iter`` / ``state.max_iters`` already; other values are an error (a
        second count would drift from the loop's)."""
        state = self.train_state
        if state is self._own_state:
            state.iter, state.max_iters = init_counts, max_counts
        elif (init_counts, max_counts) != (state.iter, state.max_iters):
            raise ValueError(f'initialize_count_status(init_counts={init_counts}, max_counts='
                             f'{max_counts}) disagrees with the train state this wrapper reads its '
                             f'accumulation window from (iter={state.iter}, max_iters='
                             f'{state.max_iters}): set runner.state instead')

    def should_update(self) -> bool:
        """Whether the current micro-batch (number ``state.iter + 1``) ends an accumulation
        window: a multiple of ``accumulative_counts``, or the run's last iteration."""
        state = self.train_state
        n = state.iter + 1
        return n % self.accumulative_counts == 0 or (state.max_iters is not None and n >= state.max_iters)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of its window's loss: ``loss / accumulative_counts``, and in
        the run's last, partial window ``loss / len(window)``, so it weighs like a full one
        (DeepSpeed's engine divides by ``accumulative_counts`` itself)."""
        counts = self.accumulative_counts
        factor = counts
        state = self.train_state
        if counts != 1 and state.max_iters is not None:
            tail = state.max_iters % counts
            if tail and state.iter >= state.max_iters - tail:
                factor = tail
        if self._engine_scales_loss:
            factor = factor / counts
        return loss / factor if factor != 1 else loss

    def optim_context(self, model):
        """Forward/backward context: no gradient all-reduce on non-updating micro-batches."""
        acc = self.accelerator
        if acc is None:
            return NO_CONTEXT
        state = acc.gradient_state
        if self.accumulative_counts == 1 or self.should_update():
            if not state.sync_gradients:
                state._set_sync_gradients(True)
            return NO_CONTEXT
        state._set_sync_gradients(False)
        return acc.no_sync(self.model if self.model is not None else model)

    # ---- the MMEngine API ----------------------------------------------------------------
    def update_params(self, loss: torch.Tensor, step_kwargs=None, zero_kwargs=None) -> None:
        """Backward one micro-batch's loss; if it ends an accumulation window, step (clipping
        first) and zero the gradients. A loss the guard rejects (NanGuardHook) is not
        backpropagated and drops the rest of its window.

        One sequence for every configuration: guard, ``scale_loss``, ``backward``,
        ``should_update``, ``step``, ``zero_grad``. On the direct path (see :meth:`bind`) the
        stages that would do nothing are skipped: the loss needs no scaling and every call ends
        a window, and backward/step/zero_grad call torch themselves (what the methods do there,
        less a Python call each: this runs between kernels, where each call costs).
        """
        if self.loss_clock is not None:  # the forward pass ends here: each rank's own work
            self.loss_clock()
        state = self.train_state
        state.stepped = False  # (the loop clears it too: a train_step may not come here)
        if self._drop_window or (self.loss_guard is not None and not self.loss_guard(loss)):
            self._drop_update(zero_kwargs)
        else:
            direct = self._direct if step_kwargs is None and zero_kwargs is None else None
            if direct is None:
                self.backward(self.scale_loss(loss))
            else:
                loss.backward()
            # Held until the next backward, as a hand-written loop's ``loss`` variable is: the
            # parameters' gradient accumulators (autograd nodes) then outlive the step instead
            # of being rebuilt by every forward (~4,500 fewer instructions per default step,
            # bench/README). After backward the graph holds no activations.
            self._last_loss = loss
            if direct is not None or self.should_update():
                if direct is None:
                    self.step(**(step_kwargs or {}))
                    self.zero_grad(**(zero_kwargs or {}))
                else:  # step(): no clipping, no scaler here
                    direct.step()
                    self.update_count += 1
                    state.stepped = True
                    direct.zero_grad()
        if state is self._own_state:  # no loop around this wrapper: it counts micro-batches
            state.iter += 1

    def _drop_update(self, zero_kwargs=None) -> None:
        """Skip a bad loss: no backward, no step, no update counted; the rest of its
        accumulation window is dropped too (every rank agrees, so DDP never waits)."""
        if not self._drop_window:
            self.zero_grad(**(zero_kwargs or {}))
        self._drop_window = not self.should_update()

    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        if self.accelerator is None or self._raw is not None:
            loss.backward(**kwargs)
        else:
            self.accelerator.backward(loss, **kwargs)

    def step(self, **kwargs) -> None:
        """Clip (if configured), step the optimizer, and publish the update: ``update_count``
        and the train state's ``stepped`` (what schedulers and EMA act on)."""
        if self.clip_grad is not None:
            self._clip()
        (self._raw or self.optimizer).step(**kwargs)
        self.update_count += 1
        self.train_state.stepped = True
        if self.scaler_skips is not None and self.accelerator.optimizer_step_was_skipped:
            self.scaler_skips += 1  # the scaler found inf/nan gradients and backed off

    def zero_grad(self, **kwargs) -> None:
        (self._raw or self.optimizer).zero_grad(**kwargs)

    def _clip(self) -> None:
        params = [p for g in self.optimizer.param_groups for p in g['params']]
        if 'clip_value' in self.clip_grad:
            if self.accelerator is None:
                torch.nn.utils.clip_grad_value_(params, self.clip_grad['clip_value'])
            else:
                self.accelerator.clip_grad_value_(params, self.clip_grad['clip_value'])
            return
        max_norm, norm_type = self.clip_grad['max_norm'], self.clip_grad.get('norm_type', 2)
        if self.accelerator is None:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
        else:
            norm = self.accelerator.clip_grad_norm_(params, max_norm, norm_type)
        self.grad_norm = norm  # a tensor: read lazily by the logger to avoid a device sync

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def get_lr(self) -> dict[str, list[float]]:
        return {'lr': [g['lr'] for g in self.optimizer.param_groups]}

    def get_momentum(self) -> dict[str, list[float]]:
        out = []
        for g in self.optimizer.param_groups:
            out.append(g['betas'][0] if 'betas' in g else g.get('momentum', 0.0))
        return {'momentum': out}

    def state_dict(self) -> dict:
        """MMEngine's: the optimizer's state dict, plus ``update_count``, ``scaler_skips`` and
        the fp16 ``loss_scaler``'s state. Under FSDP2 it is keyed by parameter names and its
        moments are this rank's shards (collective: every rank calls it)."""
        if self._sharded is not None:
            from .sharding import optimizer_state
            state = optimizer_state(self._sharded, self._torch_optimizer())
        elif self._engine_scales_loss:  # DeepSpeed: each rank's ZeRO partition is saved apart
            state = {}                  # (checkpoint/zero.py)
        else:
            state = self.optimizer.state_dict()
        state = dict(state, update_count=self.update_count)
        if self.scaler_skips is not None:
            state['scaler_skips'] = self.scaler_skips
        scaler = getattr(self.accelerator, 'scaler', None)
        if scaler is not None:  # fp16: the loss scale and its growth tracker resume exactly
            state['loss_scaler'] = scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.update_count = int(state.pop('update_count', self.update_count))
        skips = state.pop('scaler_skips', None)
        if skips is not None:
            self.scaler_skips = int(skips)
        scaler_state = state.pop('loss_scaler', None)
        scaler = getattr(self.accelerator, 'scaler', None)
        if scaler is not None and scaler_state is not None:
            scaler.load_state_dict(scaler_state)
        if self._sharded is not None:
            from .sharding import load_optimizer_state
            load_optimizer_state(self._sharded, self._torch_optimizer(), state)
        elif not self._engine_scales_loss:  # DeepSpeed's partitions: checkpoint/zero.py
            self.optimizer.load_state_dict(state)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, 'optimizer', self.optimizer)  # inside Accelerate's wrapper

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(optimizer={type(self.optimizer).__name__}, '
                f'accumulative_counts={self.accumulative_counts}, clip_grad={self.clip_grad})')


def updates_per_epoch(optim_wrapper, iters: int | None) -> int | None:
    """Optimizer updates in a pass of ``iters`` iterations (None: unknown), one per started
    window of ``accumulative_counts``: what schedulers with ``convert_to_iter_based`` count an
    epoch in, since they step once per update."""
    if iters is None:
        return None
    return -(-iters // getattr(optim_wrapper, 'accumulative_counts', 1))


CLIP_KEYS = ('type', 'max_norm', 'norm_type', 'clip_value')
CLIP_TYPES = {'norm': 'max_norm', 'value': 'clip_value'}  # MMEngine's type= and the key it needs


def _check_clip_grad(clip_grad: Any, where: str = 'optim_wrapper.clip_grad') -> dict:
    usage = ("dict(max_norm=..., norm_type=2) or dict(clip_value=...) (MMEngine's "
             "dict(type='norm', max_norm=...) and dict(type='value', clip_value=...) too)")
    if not isinstance(clip_grad, dict):
        raise ConfigError(f'{where} = {clip_grad!r} is not valid: it takes {usage} (or None)')
    clip_grad = dict(clip_grad)
    kind = clip_grad.pop('type', None)
    if kind is not None:
        if kind not in CLIP_TYPES:
            near = did_you_mean(str(kind), CLIP_TYPES)
            did = f' (did you mean {near!r}?)' if near else ''
            raise ConfigError(f"{where}.type = {kind!r} is not valid{did}: it takes 'norm' "
                              f"(with max_norm=...) or 'value' (with clip_value=...)")
        need = CLIP_TYPES[kind]
        other = CLIP_TYPES['value' if kind == 'norm' else 'norm']
        if need not in clip_grad:
            raise ConfigError(f"{where}: type={kind!r} needs {need}=..., e.g. "
                              f"dict(type={kind!r}, {need}=1.0)")
        if other in clip_grad:
            raise ConfigError(f"{where}: type={kind!r} clips by {need}, but {other} is set too: "
                              f'remove {where}.{other}')
        if kind == 'value' and 'norm_type' in clip_grad:
            raise ConfigError(f"{where}.norm_type is only for type='norm'")
    for key in clip_grad:
        if key not in CLIP_KEYS:
            near = did_you_mean(str(key), CLIP_KEYS)
            did = f': did you mean {where}.{near}?' if near else ''
            raise ConfigError(f'{where}.{key} = {clip_grad[key]!r} is not a clip_grad key{did} '
                              f'({where} takes {usage})')
    if not ({'max_norm', 'clip_value'} & set(clip_grad)):
        raise ConfigError(f'{where} = {clip_grad!r} needs max_norm or clip_value: it takes {usage}')
    if 'max_norm' in clip_grad:
        check_number(clip_grad['max_norm'], f'{where}.max_norm', low=0, low_open=True,
                     example='max_norm=1.0')
    if 'clip_value' in clip_grad:
        check_number(clip_grad['clip_value'], f'{where}.clip_value', low=0, low_open=True)
    norm_type = clip_grad.get('norm_type', 2)
    if not (norm_type in ('inf', 'fro') or (is_number(norm_type) and norm_type > 0)):
        raise bad_value(f'{where}.norm_type', norm_type, "a number > 0 or 'inf'", 'norm_type=2')
    return clip_grad


FUSED_TYPES = ('Adam', 'AdamW', 'SGD', 'Adagrad')


def fused_on_gpu(cfg: Any, accelerator) -> Any:
    """``cfg`` with ``optimizer.fused=True`` when the run is on a CUDA device (not under
    DeepSpeed, which runs its own optimizer step), the optimizer is torch's Adam, AdamW, SGD or
    Adagrad and the config chose neither ``fused`` nor ``foreach``: the fastest of torch's
    implementations there (Hugging Face's Trainer defaults to it too), and one whose step takes
    a ``found_inf`` flag, so NanGuardHook needs no per-step host read."""
    opt = cfg.get('optimizer') if isinstance(cfg, dict) else None
    if (not isinstance(opt, dict) or 'fused' in opt or 'foreach' in opt or accelerator is None
            or getattr(accelerator.device, 'type', None) != 'cuda'
            or accelerator.distributed_type == 'DEEPSPEED'):
        return cfg
    kind = opt.get('type')
    if isinstance(kind, str):  # a registry name, or torch.optim.AdamW
        torch_own = kind.rsplit('.', 1)[-1] in FUSED_TYPES and kind.startswith(('torch.optim.', *FUSED_TYPES))
    else:
        name = getattr(kind, '__name__', '')
        torch_own = name in FUSED_TYPES and getattr(torch.optim, name, None) is kind
    if not torch_own:
        return cfg
    return {**cfg, 'optimizer': {**opt, 'fused': True}}


def build_optim_wrapper(cfg: Any, model: torch.nn.Module) -> OptimWrapper:
    """Build ``optim_wrapper=dict(optimizer=dict(type='AdamW', lr=...), clip_grad=..., ...)``.

    MMEngine's forms too: ``paramwise_cfg=...``, ``constructor='MyConstructor'`` (see
    :mod:`~scale_runner.optim_constructor`), and several optimizers, ``dict(generator=dict(
    optimizer=...), discriminator=dict(...))`` (or a dict of built wrappers): an
    :class:`~scale_runner.optim_wrapper_dict.OptimWrapperDict`."""
    from .optim_wrapper_dict import OptimWrapperDict
    if isinstance(cfg, (OptimWrapper, OptimWrapperDict)):
        return cfg
    if isinstance(cfg, torch.optim.Optimizer):
        return OptimWrapper(cfg)
    if not isinstance(cfg, dict):
        raise ConfigError(f'optim_wrapper = {cfg!r} is not valid: it takes a dict, e.g. '
                          f"optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3)), or an "
                          f'OptimWrapper (got a {type(cfg).__name__})')
    cfg = dict(cfg)
    constructor = cfg.pop('constructor', None)
    if constructor is None and 'optimizer' not in cfg and _several(cfg):
        constructor = 'MultiOptimWrapperConstructor'
    if constructor is not None or 'paramwise_cfg' in cfg:
        from .optim_constructor import build_with_constructor
        return build_with_constructor(constructor or 'DefaultOptimWrapperConstructor', cfg, model)
    cfg.setdefault('type', 'OptimWrapper')
    optimizer = cfg.get('optimizer')
    if optimizer is None:
        near = did_you_mean('optimizer', [k for k in cfg if isinstance(k, str) and k != 'type'])
        if near is not None:
            raise ConfigError(f'optim_wrapper.{near} = {cfg[near]!r} is not an optim_wrapper key: '
                              f'did you mean optim_wrapper.optimizer? (optim_wrapper.optimizer '
                              f"is missing: e.g. optim_wrapper=dict(optimizer=dict(type='AdamW', "
                              f'lr=1e-3)))')
        raise ConfigError("optim_wrapper.optimizer is missing: e.g. "
                          "optim_wrapper=dict(optimizer=dict(type='AdamW', lr=1e-3))")
    if isinstance(optimizer, dict):
        cfg['optimizer'] = OPTIMIZERS.build(optimizer, _cfg_path='optim_wrapper.optimizer',
                                            _check=check_optimizer_args, _wrap_errors=True,
                                            params=model.parameters())
    elif not isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, 'step'):
        raise ConfigError(f'optim_wrapper.optimizer = {optimizer!r} is not valid: it takes '
                          f"dict(type='AdamW', lr=1e-3, ...) or a built torch optimizer")
    return OPTIM_WRAPPERS.build(cfg, _cfg_path='optim_wrapper')


def _several(cfg: dict) -> bool:
    """An ``optim_wrapper`` of several wrappers: every value a wrapper config (with
    ``optimizer``) or a built ``OptimWrapper``, and no key of a single wrapper's."""
    if not cfg or 'type' in cfg or did_you_mean('optimizer', [k for k in cfg if isinstance(k, str)]):
        return False
    return all(isinstance(v, OptimWrapper) or (isinstance(v, dict) and 'optimizer' in v)
               for v in cfg.values())
