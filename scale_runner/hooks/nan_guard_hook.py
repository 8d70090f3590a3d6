"""NanGuardHook: a NaN or Inf loss stops the run on every rank (or its update is skipped)."""
from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from ..registry import HOOKS
from .hook import Hook


class NonFiniteLossError(RuntimeError):
    """A train loss was NaN or Inf (raised on every rank at the same iteration)."""


@HOOKS.register_module()
class NanGuardHook(Hook):
    """The default ``nan_guard`` hook: checks every train loss before its backward pass.

    The check runs inside ``OptimWrapper.update_params`` (the hook installs it as
    ``optim_wrapper.loss_guard``), so a bad loss never reaches the weights:

    - ``mode='raise'`` (default): raise :class:`NonFiniteLossError` on every rank at the same
      iteration, naming the iteration, the rank(s) and NaN or Inf. Nothing is written after it
      (the checkpoint hook never sees the iteration). On the device path (below) it is raised
      at the next read of the flag, naming the first bad iteration.
    - ``mode='skip'``: drop that update (no backward, no optimizer step, gradients zeroed, the
      update counter, schedulers and EMA not advanced; with gradient accumulation the whole
      window is dropped), count it (``nan_skips``, logged with the losses) and log a warning. More than
      ``max_consecutive`` bad losses in a row raise.

    **On the device** (``'raise'``; no fp16 loss scaler; one process or DDP; ``device_flag``
    below): no host read per step. Each loss sets a device flag (two tiny in-place kernels).
    The host reads the flag every ``check_interval`` iterations (default: the logger's interval,
    else 50), before every checkpoint save and validation, and at the end of training, and then
    raises naming the *first* bad iteration: the report comes at most ``check_interval``
    iterations late, and nothing is saved after it. An optimizer that takes ``found_inf``
    (torch's ``fused=True`` Adam, AdamW, SGD, Adagrad) receives the flag, as from a grad
    scaler: from the first bad loss on every update is a no-op on the device (weights, moments
    and step counts untouched). Other optimizers keep updating until the read, so the weights
    in memory of the stopped run are not finite (the checkpoints before it are). With several
    processes the flag is max-all-reduced per step (a device-side collective with NCCL: it
    does not block the host), since DDP shares gradients.

    ``device_flag``: ``None`` (default) uses the flag with a fused optimizer, and on an
    accelerator (GPU) with any optimizer, where a host read per step would wait for the
    device every iteration; on a CPU the host read costs nothing and stays. ``True``: the flag
    wherever it can run (also on a CPU); ``False``: the host read per step.

    **On the host** (``'skip'``, and ``'raise'`` on a CPU with other optimizers, with a loss
    scaler, FSDP or DeepSpeed, or ``device_flag=False``): one read of the loss per step
    (``loss.item()``, a device sync on the GPU) and ``math.isfinite``; with several processes
    the losses of all ranks are first summed into one small vector (one all-reduce), so every
    rank takes the same decision. ``'skip'`` stays here because the update counter, schedulers,
    EMA and the accumulation window are decided on the host and must know, before they act,
    that the update is dropped. A custom ``train_step`` that bypasses ``update_params`` is
    checked after the step (``'raise'`` only: the update is done).
    """

    priority = 'VERY_HIGH'

    def __init__(self, mode: str = 'raise', max_consecutive: int = 10, check_interval: int | None = None,
                 device_flag: bool | None = None):
        if device_flag is not None and not isinstance(device_flag, bool):
            raise ConfigError(f'default_hooks.nan_guard.device_flag must be None (the flag on a GPU or '
                              f'with a fused optimizer), True or False, got {device_flag!r}')
        if mode not in ('raise', 'skip'):
            raise ConfigError(f"default_hooks.nan_guard.mode must be 'raise' or 'skip', got {mode!r}")
        if not isinstance(max_consecutive, int) or isinstance(max_consecutive, bool) or max_consecutive < 0:
            raise ConfigError(f'default_hooks.nan_guard.max_consecutive must be an int >= 0, '
                              f'got {max_consecutive!r}')
        if check_interval is not None and (not isinstance(check_interval, int)
                                           or isinstance(check_interval, bool) or check_interval < 1):
            raise ConfigError(f'default_hooks.nan_guard.check_interval must be a positive int (iterations '
                              f"between the host's reads of the device flag) or None (the logger's "
                              f'interval), got {check_interval!r}')
        self.mode = mode
        self.max_consecutive = max_consecutive
        self.check_interval = check_interval
        self.device_flag = device_flag
        self.on_device = False  # this run's check: the device flag (True) or a host read per step
        self._every = 50        # iterations between the host's reads of the device flag
        self._found = None      # the device flag (float 0/1), the optimizer's found_inf
        self._seen: list = []   # (iteration, epoch, loss) since the last read of the flag
        self._gated = None      # the torch optimizer the flag gates
        self._state = None
        self.nan_skips = 0    # updates skipped so far (saved in checkpoints)
        self.consecutive = 0    # bad losses in a row
        self._runner = None
        self._world, self._rank = 1, 0
        self._checked = False   # check() ran in the current iteration
        self._dropped = False   # ... and skipped its update

    # ---- installation ---------------------------------------------------------------------
    def before_train(self, runner) -> None:
        self._runner = runner
        acc = runner.accelerator
        self._world, self._rank = acc.num_processes, acc.process_index
        wrapper = runner.optim_wrapper
        flaggable = self.mode == 'raise' and self.device_flag is not False and _flaggable(runner, wrapper)
        self._gated = _gate(wrapper) if flaggable else None
        device = getattr(acc, 'device', None)
        self.on_device = flaggable and (self._gated is not None or self.device_flag is True
                                        or getattr(device, 'type', 'cpu') != 'cpu')
        self._found, self._seen, self._state = None, [], runner.state
        if self.on_device:
            logger = runner.get_hook('LoggerHook')
            self._every = self.check_interval or getattr(logger, 'interval', None) or 50
        wrapper.loss_guard = self.flag if self.on_device else self.check
        self._checked = self._dropped = False
        # A host check that raises, under the built-in train step: update_params checks every
        # loss, so after_train_iter has nothing to do and is not called
        idle = not self.on_device and self.mode == 'raise' and _checks_every_loss(runner)
        self.idle_points = frozenset({'after_train_iter'}) if idle else frozenset()

    def after_train(self, runner) -> None:
        self._read_flag()  # the last iterations' losses (raises if one was bad)
        self._release()
        if getattr(runner.optim_wrapper, 'loss_guard', None) in (self.check, self.flag):
            runner.optim_wrapper.loss_guard = None
        self._runner = None

    def _release(self) -> None:
        if self._gated is not None and getattr(self._gated, 'found_inf', None) is self._found:
            del self._gated.found_inf
        self._gated, self._found, self._seen = None, None, []

    # ---- the device flag (called by OptimWrapper.update_params before backward) --------------
    def flag(self, loss: torch.Tensor, iteration: int | None = None) -> bool:
        """Fold ``loss``'s finiteness into the device flag (which a fused optimizer's updates
        are gated by); no host read. Always True: the host learns of it at the next read."""
        self._checked = True
        found = self._found
        if found is None:  # the first loss: the flag lives on its device
            found = self._found = torch.zeros((), dtype=torch.float32, device=loss.device)
            if self._gated is not None:
                self._gated.found_inf = found  # read by the fused step, as a grad scaler's is
        loss = loss.detach()
        # found + 0 * loss is NaN for a NaN or +-Inf loss, then 1; once 1, it stays 1 (a fused
        # optimizer's later updates are gated too). Two in-place kernels: a third of isfinite's cost on a CPU.
        found.add_(loss if not loss.dim() else loss.sum(), alpha=0).nan_to_num_(nan=1.0)
        if self._world > 1:  # DDP's averaged gradients carry any rank's NaN: every rank gates
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        state = self._state
        self._seen.append((state.iter + 1, state.epoch, loss))
        return True

    def _read_flag(self) -> None:
        """The host's read of the device flag: raise, naming the first bad loss, if it is set."""
        seen, self._seen = self._seen, []
        if not seen or self._found is None or not self._found.item():
            return
        from ..logs import to_floats
        values = to_floats([loss for _, _, loss in seen])  # one transfer; NaN/Inf survive a mean
        mine = next(([it, epoch, v] for (it, epoch, _), v in zip(seen, values) if not math.isfinite(v)),
                    None)
        if self._world > 1:
            from ..collective import gather
            ranks = gather(mine)
        else:
            ranks = [mine]
        first = min(r[0] for r in ranks if r is not None)
        epoch = next(r[1] for r in ranks if r is not None and r[0] == first)
        losses = [r[2] if r is not None and r[0] == first else 0.0 for r in ranks]
        checked, gated = self._state.iter, self._gated is not None
        self._release()
        late = (f'; read at iteration {checked}: ' + ('no update since' if gated else
                'the updates since were made, the weights in memory are not finite')
                if checked > first else '')
        self._bad(losses, first, epoch=epoch, late=late)

    # ---- the host check (called by OptimWrapper.update_params before backward) ----------------
    def check(self, loss: torch.Tensor, iteration: int | None = None) -> bool:
        """True: go on. False: skip this update. Raises in ``'raise'`` mode."""
        self._checked = True
        if self._world == 1:
            # one host read of the loss (a sync on the GPU), then a float check: no kernel
            try:
                value = loss.item()
            except RuntimeError:  # more than one element: NaN / Inf anywhere survive the sum
                value = loss.detach().sum().item()
            if math.isfinite(value):
                if self.consecutive:
                    self.consecutive = 0
                return True
            losses = [value]
        else:
            value = loss.detach()
            if value.numel() != 1:
                value = value.sum()  # NaN / Inf anywhere survive the sum
            vec = torch.zeros(self._world, dtype=torch.float32, device=value.device)
            vec[self._rank] = value.reshape(())
            torch.distributed.all_reduce(vec)  # rank r's loss lands in slot r, on every rank
            if bool(torch.isfinite(vec).all()):
                if self.consecutive:
                    self.consecutive = 0
                return True
            losses = vec.tolist()
        return self._bad(losses, iteration)

    def _bad(self, losses: list, iteration: int | None, epoch: int | None = None, late: str = '') -> bool:
        runner = self._runner
        it = iteration if iteration is not None else (runner.iter + 1 if runner else 0)
        bad = ', '.join(f'rank {r}: {"NaN" if math.isnan(v) else "Inf" if v > 0 else "-Inf"}'
                        for r, v in enumerate(losses) if not math.isfinite(v))
        epoch = epoch if epoch is not None else (runner.epoch if runner is not None else 0)
        where = f'iteration {it}' + (f' (epoch {epoch + 1})'
                                     if runner is not None and runner.max_epochs else '')
        msg = f'non-finite loss at {where} [{bad}] (seen on rank {self._rank}{late})'
        self.consecutive += 1
        if self.mode == 'raise' or self.consecutive > self.max_consecutive:
            if self.mode == 'skip':
                msg += f': {self.consecutive} in a row, more than max_consecutive={self.max_consecutive}'
            msg += ('. Nothing was saved after it. Lower the lr, add clip_grad, check the data; or '
                    "default_hooks.nan_guard.mode='skip' to drop such updates")
            if runner is not None:
                runner.logger.error(msg)
            raise NonFiniteLossError(msg)
        self.nan_skips += 1
        self._dropped = True
        if runner is not None:
            runner.logger.warning(f'{msg}: update skipped ({self.nan_skips} skipped so far, '
                                  f'{self.consecutive} in a row)')
        return False

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._checked:  # update_params checked this iteration's loss
            self._checked = False
            if self.on_device:  # read the flag every _every iterations (and at the last one)
                state, every = runner.state, self._every
                if not state.iter % every or not state.inner_iter % every or state.iter == state.max_iters:
                    self._read_flag()
            elif self._dropped:
                self._dropped = False
                if isinstance(outputs, dict):
                    # keep NaN out of the logged means; report the count instead
                    for k in [k for k, v in outputs.items()
                              if isinstance(v, torch.Tensor) and not bool(torch.isfinite(v).all())]:
                        del outputs[k]
                    outputs['nan_skips'] = self.nan_skips
            return
        # a train_step that did not call update_params: check its logged loss (after the fact)
        loss = outputs.get('loss') if isinstance(outputs, dict) else None
        if isinstance(loss, torch.Tensor):
            mode, self.mode = self.mode, 'raise'
            try:
                self._runner = runner
                self.check(loss, iteration=runner.iter)
            finally:
                self.mode = mode
                self._checked = False

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        self._read_flag()  # no checkpoint after a bad loss

    def before_val(self, runner) -> None:
        self._read_flag()

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {'nan_skips': self.nan_skips, 'consecutive': self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.nan_skips = int(state.get('nan_skips', 0))
        self.consecutive = int(state.get('consecutive', 0))


def _flaggable(runner, wrapper) -> bool:
    """Whether the device flag can replace the host check: the built-in wrapper with no fp16
    loss scaler, one process or DDP (not FSDP or DeepSpeed)."""
    from ..optim import FAST_TYPES, OptimWrapper
    acc = runner.accelerator
    return (isinstance(wrapper, OptimWrapper) and acc is not None and acc.scaler is None
            and acc.distributed_type in FAST_TYPES and wrapper._sharded is None)


def _gate(wrapper):
    """The torch optimizer the flag can gate (its ``step`` takes ``found_inf``), or None."""
    opt = getattr(wrapper.optimizer, 'optimizer', wrapper.optimizer)  # inside Accelerate's wrapper
    if (not getattr(opt, '_step_supports_amp_scaling', False)
            or getattr(opt, 'found_inf', None) is not None):
        return None  # not a fused torch optimizer, or a grad scaler's flag is there already
    return opt


def _checks_every_loss(runner) -> bool:
    """Whether every train loss goes through ``OptimWrapper.update_params`` (and so through the
    guard): the built-in train step (no ``train_step`` of the model's own) and a wrapper whose
    ``update_params`` is the built-in one."""
    from ..model import BaseModel, unwrap
    from ..optim import OptimWrapper
    wrapper = runner.optim_wrapper
    step = getattr(type(unwrap(runner.model)), 'train_step', None)
    return (getattr(type(wrapper), 'update_params', None) is OptimWrapper.update_params
            and (step is None or step is BaseModel.train_step))
