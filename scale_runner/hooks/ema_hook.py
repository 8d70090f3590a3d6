"""EMAHook: an exponential moving average of the weights, used for validation and test."""
from __future__ import annotations

import torch

from ..checkpoint import CheckpointError
from ..errors import ConfigError
from ..model import unwrap
from ..checkpoint.sharded import is_dtensor
from ..sharding import copy_into
from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class EMAHook(Hook):
    """MMEngine's ``EMAHook`` with ``ExponentialMovingAverage``: after every optimizer *update*
    (not every micro-batch; a skipped update does not count), ``ema += momentum * (param - ema)``.

    - ``momentum``: weight of the new weights (MMEngine's convention; 0.0002 by default).
    - ``interval``: average every ``interval`` updates.
    - ``update_buffers``: average floating-point buffers (BatchNorm statistics) too; otherwise
      the averaged model uses the live buffers.
    - ``begin_iter`` / ``begin_epoch``: until iteration ``begin_iter`` (1-based) / epoch
      ``begin_epoch`` the average just follows the weights; averaging starts from there.
    - ``strict_load``: on resume, a checkpoint without EMA state (or with other keys) is an
      error; otherwise the average restarts from the resumed weights (with a warning).

    The averaged weights are swapped into the model for every validation and test epoch and
    swapped back after (exact copies, so training continues bit for bit); ``test()`` after
    ``train()`` on the same runner evaluates the average too. Checkpoints hold the *training*
    weights in ``model.safetensors`` (so resume is exact) and the average as the hook's state
    (``hooks.EMAHook.ema.*``); ``val()``/``test()`` with ``load_from`` such a checkpoint
    evaluate its average (a ``train()`` from ``load_from`` starts a new average from the loaded
    weights). Under DDP the average is kept per process (every rank has the same weights, so
    the same average); under FSDP2 it is sharded like the parameters and saved as shards.
    """

    priority = 'NORMAL'

    def __init__(self, ema_type: str = 'ExponentialMovingAverage', momentum: float = 0.0002,
                 interval: int = 1, update_buffers: bool = False, strict_load: bool = False,
                 begin_iter: int = 0, begin_epoch: int = 0):
        if ema_type != 'ExponentialMovingAverage':
            raise ConfigError(f"EMAHook.ema_type: only 'ExponentialMovingAverage' is supported, "
                              f'got {ema_type!r}')
        if not isinstance(momentum, (int, float)) or not 0 < momentum < 1:
            raise ConfigError(f'EMAHook.momentum must be in (0, 1), got {momentum!r} (the weight of '
                              f'the new weights: ema = (1 - momentum) * ema + momentum * param)')
        for name, value in (('interval', interval), ('begin_iter', begin_iter), ('begin_epoch', begin_epoch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < (name == 'interval'):
                raise ConfigError(f'EMAHook.{name} must be an int >= {int(name == "interval")}, got {value!r}')
        if begin_iter and begin_epoch:
            raise ConfigError('EMAHook: set begin_iter or begin_epoch, not both')
        self.momentum = float(momentum)
        self.interval = interval
        self.update_buffers = update_buffers
        self.strict_load = strict_load
        self.begin_iter = begin_iter
        self.begin_epoch = begin_epoch
        self.steps = 0           # updates averaged (the first one copies)
        self._names: list[str] = []
        self._src: list[torch.Tensor] = []
        self._ema: list[torch.Tensor] = []
        self._src_l: list[torch.Tensor] = []  # their local tensors (the same ones without FSDP2)
        self._ema_l: list[torch.Tensor] = []
        self._swapped = False
        self._model = None  # the module whose weights are averaged
        self._restored = False  # load_state_dict ran for the current resume

    # ---- setup ------------------------------------------------------------------------------
    def before_run(self, runner) -> None:
        _check_engine(runner)
        model = unwrap(runner.model)
        named = list(model.named_parameters())
        if self.update_buffers:
            named += list(model.named_buffers())
        named = [(n, t) for n, t in named if t.is_floating_point()]
        if model is self._model and [n for n, _ in named] == self._names:
            return  # test() after train(): the same model, whose average is kept
        self._model = model
        self._names = [n for n, _ in named]
        self._src = [t.detach() for _, t in named]
        self._ema = [t.clone() for t in self._src]
        # The averaging is elementwise: under FSDP2 each rank averages its own shards, on the
        # local tensors (DTensor has no foreach kernels); the DTensors are what is saved.
        self._src_l, self._ema_l = _local(self._src), _local(self._ema)
        self.steps = 0
        self._restored = False
        loaded = runner.loaded_hook_state(self)
        if loaded is not None and runner.train_loop is None:
            # val()/test() of a load_from checkpoint: evaluate its average, as it was saved.
            self._load_average(loaded)
            runner.logger.info('EMAHook: validation and test use the average saved in the '
                               'load_from checkpoint')

    def before_train(self, runner) -> None:
        if runner.max_epochs is not None and self.begin_epoch > runner.max_epochs:
            runner.logger.warning(f'EMAHook.begin_epoch={self.begin_epoch} > max_epochs: no averaging')
        elif runner.max_iters is not None and self.begin_iter > runner.max_iters:
            runner.logger.warning(f'EMAHook.begin_iter={self.begin_iter} > max_iters: no averaging')

    # ---- averaging --------------------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not runner.state.stepped:
            return  # a micro-batch inside an accumulation window, or a skipped update
        with torch.no_grad():
            if runner.iter < self.begin_iter or runner.epoch + 1 < self.begin_epoch:
                torch._foreach_copy_(self._ema_l, self._src_l)  # not started: follow the weights
                return
            if self.steps == 0:
                torch._foreach_copy_(self._ema_l, self._src_l)
            elif self.steps % self.interval == 0:
                torch._foreach_lerp_(self._ema_l, self._src_l, self.momentum)
        self.steps += 1

    @property
    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by name (the live ones, not copies)."""
        return dict(zip(self._names, self._swapped and self._src or self._ema))

    # ---- validation / test use the average ----------------------------------------------------
    def _swap(self, want: bool) -> None:
        if self._swapped == want:
            return
        with torch.no_grad():
            for src, ema in zip(self._src_l, self._ema_l):
                tmp = src.clone()
                src.copy_(ema)
                ema.copy_(tmp)
        self._swapped = want

    def before_val_epoch(self, runner) -> None:
        self._swap(True)

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._swap(False)  # before CheckpointHook's best checkpoints: they hold training weights

    before_test_epoch = before_val_epoch

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._swap(False)

    def after_run(self, runner) -> None:
        self._swap(False)  # an exception during validation must not leave the average in

    # ---- checkpoints ------------------------------------------------------------------------
    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._swapped:
            runner.logger.warning('EMAHook: a checkpoint is saved while the averaged weights are '
                                  'swapped in; its model weights are the average, not training\'s')

    def state_dict(self) -> dict:
        """The average (the live tensors: under FSDP2 this rank's shards, saved sharded like
        the parameters), its step count and momentum."""
        return {'ema': self.ema_state_dict, 'steps': self.steps, 'momentum': self.momentum}

    def load_state_dict(self, state: dict) -> None:
        self._load_average(state)
        self._restored = True

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        if self._restored:
            return
        if self.strict_load:
            raise CheckpointError('EMAHook(strict_load=True): the checkpoint has no EMA state; '
                                  'set strict_load=False to restart the average from its weights')
        runner.logger.warning('EMAHook: the checkpoint has no EMA state; the average restarts '
                              'from the resumed weights')
        with torch.no_grad():
            torch._foreach_copy_(self._ema_l, self._src_l)
        self.steps = 0

    def _load_average(self, state: dict) -> None:
        """Take the average (and its step count) from a checkpoint's ``hooks.EMAHook``."""
        saved = state.get('ema', {})
        missing = [n for n in self._names if n not in saved]
        unexpected = [n for n in saved if n not in self._names]
        if self.strict_load and (missing or unexpected):
            raise CheckpointError(f'EMAHook(strict_load=True): EMA state does not match the model: '
                                  f'missing {missing}, unexpected {unexpected}')
        with torch.no_grad():
            for name, ema, src in zip(self._names, self._ema, self._src):
                if name in saved:
                    if saved[name].shape != ema.shape:
                        raise CheckpointError(f'EMAHook: {name} has shape {tuple(saved[name].shape)} '
                                              f'in the checkpoint, {tuple(ema.shape)} in the model')
                    copy_into(ema, saved[name])
                else:
                    ema.copy_(src)
        self.steps = int(state.get('steps', 0))


def _local(tensors: list) -> list:
    """Each tensor's local part: a ``DTensor``'s shard (sharing its storage), else itself."""
    return [t.to_local() if is_dtensor(t) else t for t in tensors]


def _check_engine(runner) -> None:
    """Refuse what an average cannot be kept for: DeepSpeed ZeRO-3 (the module's parameters are
    empty placeholders; each rank holds a flat partition) and DeepSpeed in half precision (the
    module's weights are bf16/fp16 copies of the fp32 master, and an average kept in them drops
    every update below their precision: with momentum 0.0002 it would never move)."""
    from ..checkpoint.zero import is_deepspeed, zero_stage
    if not is_deepspeed(runner.accelerator):
        return
    stage = zero_stage(runner.model)
    if stage == 3:
        raise ConfigError('EMAHook under DeepSpeed ZeRO-3 (accelerator.deepspeed.zero_optimization.'
                          'stage=3): the module holds no whole parameters to average. Use ZeRO-1/2 '
                          'in fp32, DDP, or FSDP2 (there the average is sharded like the weights)')
    dtype = next((p.dtype for p in unwrap(runner.model).parameters() if p.is_floating_point()), None)
    if dtype in (torch.bfloat16, torch.float16):
        raise ConfigError(f'EMAHook under DeepSpeed in {dtype} (accelerator.mixed_precision='
                          f'{runner.accelerator.mixed_precision!r}): the module\'s weights are {dtype} '
                          f'copies of the fp32 master, and an average kept in them would not move. '
                          f'Use fp32 under ZeRO-{stage}, or DDP / FSDP2 with mixed precision (their '
                          f'weights stay fp32)')
