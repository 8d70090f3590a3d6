"""CheckpointHook: periodic, crash-safe checkpoints with retention."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ConfigError
from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class CheckpointHook(Hook):
    """Save every ``interval`` epochs (``by_epoch``) or iterations, and at the end (``save_last``).

    ``by_epoch=None`` follows the train loop. ``max_keep_ckpts`` keeps the newest N periodic
    checkpoints; older ones are deleted only after a newer one is completely written.
    ``filename_tmpl`` defaults to ``'epoch_{}'`` / ``'iter_{}'``.
    """

    priority = 'VERY_LOW'

    def __init__(self, interval: int = 1, by_epoch: bool | None = None, save_optimizer: bool = True,
                 save_param_scheduler: bool = True, out_dir: str | None = None,
                 max_keep_ckpts: int = -1, save_last: bool = True, save_begin: int = 0,
                 filename_tmpl: str | None = None):
        if not isinstance(interval, int):
            raise ConfigError(f'default_hooks.checkpoint.interval must be an int, got {interval!r}')
        self.interval = interval
        self.by_epoch = by_epoch
        self.save_optimizer = save_optimizer
        self.save_param_scheduler = save_param_scheduler
        self.out_dir = out_dir
        self.max_keep_ckpts = max_keep_ckpts
        self.save_last = save_last
        self.save_begin = save_begin
        self.filename_tmpl = filename_tmpl
        self._saved: list[str] = []

    def before_train(self, runner) -> None:
        if self.by_epoch is None:
            self.by_epoch = runner.state.max_epochs is not None
        if self.filename_tmpl is None:
            self.filename_tmpl = 'epoch_{}' if self.by_epoch else 'iter_{}'
        self.root = Path(self.out_dir) if self.out_dir else runner.checkpoint_dir

    def after_train_epoch(self, runner) -> None:
        if self.by_epoch and self._due(runner.epoch, runner.state.max_epochs):
            self._save(runner, runner.epoch)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if not self.by_epoch and self._due(runner.iter, runner.max_iters):
            self._save(runner, runner.iter)

    def _due(self, progress: int, last: int | None) -> bool:
        if progress < self.save_begin:
            return False
        periodic = self.interval > 0 and progress % self.interval == 0
        return periodic or (self.save_last and progress == last)

    def _save(self, runner, progress: int) -> None:
        name = self.filename_tmpl.format(progress)
        # Listed before saving, so the checkpoint's own copy of the list includes itself.
        if name in self._saved:
            self._saved.remove(name)
        self._saved.append(name)
        runner.save_checkpoint(self.root / name, save_optimizer=self.save_optimizer,
                               save_param_scheduler=self.save_param_scheduler)
        if self.max_keep_ckpts > 0 and runner.accelerator.is_main_process:
            while len(self._saved) > self.max_keep_ckpts:
                shutil.rmtree(self.root / self._saved.pop(0), ignore_errors=True)

    def state_dict(self) -> dict:
        return {'saved': list(self._saved)}

    def load_state_dict(self, state: dict) -> None:
        self._saved = list(state.get('saved', []))

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        checkpoint['hooks']['CheckpointHook'] = self.state_dict()

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self.load_state_dict(checkpoint.get('hooks', {}).get('CheckpointHook', {}))
