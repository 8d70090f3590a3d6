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
      (the checkpoint hook never sees the iteration).
    - ``mode='skip'``: drop that update (no backward, no optimizer step, gradients zeroed, the
      update counter, schedulers and EMA not advanced; with gradient accumulation the whole
      window is dropped), count it (``nan_skips``, logged with the losses) and log a warning. More than
      ``max_consecutive`` bad losses in a row raise.

    Cost per step: one read of the loss on the host (``loss.item()``, a device sync on the GPU)
    and ``math.isfinite``; with several processes, the losses of all ranks are first summed into
    one small vector (one all-reduce), so every rank takes the same decision. A custom ``train_step`` that bypasses
    ``update_params`` is checked after the step instead (``'raise'`` only: the update is done).
    """

    priority = 'VERY_HIGH'

    def __init__(self, mode: str = 'raise', max_consecutive: int = 10):
        if mode not in ('raise', 'skip'):
            raise ConfigError(f"default_hooks.nan_guard.mode must be 'raise' or 'skip', got {mode!r}")
        if not isinstance(max_consecutive, int) or isinstance(max_consecutive, bool) or max_consecutive < 0:
            raise ConfigError(f'default_hooks.nan_guard.max_consecutive must be an int >= 0, '
                              f'got {max_consecutive!r}')
        self.mode = mode
        self.max_consecutive = max_consecutive
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
        runner.optim_wrapper.loss_guard = self.check
        self._checked = self._dropped = False

    def after_train(self, runner) -> None:
        if getattr(runner.optim_wrapper, 'loss_guard', None) == self.check:
            runner.optim_wrapper.loss_guard = None
        self._runner = None

    # ---- the check (called by OptimWrapper.update_params before backward) --------------------
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

    def _bad(self, losses: list, iteration: int | None) -> bool:
        runner = self._runner
        it = iteration if iteration is not None else (runner.iter + 1 if runner else 0)
        bad = ', '.join(f'rank {r}: {"NaN" if math.isnan(v) else "Inf" if v > 0 else "-Inf"}'
                        for r, v in enumerate(losses) if not math.isfinite(v))
        where = f'iteration {it}' + (f' (epoch {runner.epoch + 1})'
                                     if runner is not None and runner.max_epochs else '')
        msg = f'non-finite loss at {where} [{bad}] (seen on rank {self._rank})'
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
            if self._dropped:
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

    # ---- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {'nan_skips': self.nan_skips, 'consecutive': self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.nan_skips = int(state.get('nan_skips', 0))
        self.consecutive = int(state.get('consecutive', 0))
