"""RuntimeInfoHook: MMEngine's ``runtime_info`` default hook, filling ``runner.message_hub``."""
from __future__ import annotations

from ..logs import PENDING, columns
from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class RuntimeInfoHook(Hook):
    """Records what other hooks read from ``runner.message_hub``:

    - infos ``cfg`` (the config's text), ``seed``, ``experiment_name``, ``dataset_meta``
      (the train dataset's ``metainfo``, when it has one); the counters ``epoch``, ``iter``,
      ``max_epochs``, ``max_iters`` are the runner's state, read live;
    - after every train iteration the scalars ``train/<key>`` of its outputs (``loss``, ...)
      as they are (tensors stay tensors until read) and ``train/lr`` (``train/<name>.lr`` per
      wrapper of an ``OptimWrapperDict``): the lr that iteration used, recorded before the
      schedulers step;
    - after each validation / test the scalars ``val/<metric>`` / ``test/<metric>`` (values
      that are no scalar become infos of the same key).

    It runs first (``VERY_HIGH``), so every later hook of the same point reads the values of
    this iteration. The infos marked ``resumed`` are saved with checkpoints.
    """

    priority = 'VERY_HIGH'

    def __init__(self):
        self._rows: list | None = None  # (lr or lrs, outputs) per iteration not yet recorded
        self._lrs: list = []
        self._one = None  # the param_groups when there is one wrapper (the per-step fast path)
        self._hub = None  # the runner's, set in before_run (state_dict() gets no runner)

    def before_run(self, runner) -> None:
        hub = self._hub = runner.message_hub
        cfg = getattr(runner, 'cfg', None)
        hub.update_info_dict(dict(cfg=cfg.pretty_text if cfg is not None else '',
                                  seed=runner.seed, experiment_name=runner.experiment_name))

    def before_train(self, runner) -> None:
        dataset = getattr(runner.train_loop.dataloader, 'dataset', None)
        meta = getattr(dataset, 'metainfo', None)
        if meta is not None:
            runner.message_hub.update_info('dataset_meta', meta)
        # Resolved once (the optimizers are prepared by now): per step only a list read
        self._lrs = [(f'train/{name}', groups) for name, groups in _param_groups(runner.optim_wrapper)]
        self._one = self._lrs[0][1] if len(self._lrs) == 1 else None
        self._rows = []
        self._hub = runner.message_hub
        self._hub.add_source(self._settle)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        # Per step only an append: the hub's scalars are filled when read (or every PENDING
        # steps), which keeps the default per-step cost at its budget (issue 15).
        rows = self._rows
        if rows is None:  # a train loop that skipped before_train
            self.before_train(runner)
            rows = self._rows
        one = self._one
        rows.append((one[0]['lr'] if one is not None else [g[0]['lr'] for _, g in self._lrs],
                     outputs))
        if len(rows) >= PENDING:
            self._settle()

    def _settle(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            return
        hub = self._hub
        if self._one is not None:
            hub.buffer(self._lrs[0][0]).extend([lr for lr, _ in rows])
        else:
            for i, (key, _) in enumerate(self._lrs):
                hub.buffer(key).extend([lrs[i] for lrs, _ in rows])
        for key, values in columns(outputs or {} for _, outputs in rows).items():
            hub.buffer(f'train/{key}').extend(values)

    def after_val_epoch(self, runner, metrics=None) -> None:
        _record(runner.message_hub, 'val', metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        _record(runner.message_hub, 'test', metrics)

    def state_dict(self) -> dict:
        """The message hub's resumable infos (MMEngine saves its hub with the checkpoint)."""
        return self._hub.state_dict() if self._hub is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self._hub is not None:  # resume runs after before_run
            self._hub.load_state_dict(state)


def _param_groups(optim_wrapper) -> list:
    """``[(lr key, param_groups)]`` of the run's wrapper (each of an ``OptimWrapperDict``)."""
    items = getattr(optim_wrapper, 'items', None)
    pairs = [(f'{n}.lr', w) for n, w in items()] if callable(items) else [('lr', optim_wrapper)]
    out = []
    for key, wrapper in pairs:
        optimizer = getattr(wrapper, 'optimizer', None)
        optimizer = getattr(optimizer, 'optimizer', optimizer)  # inside Accelerate's wrapper
        if optimizer is not None and getattr(optimizer, 'param_groups', None):
            out.append((key, optimizer.param_groups))
    return out


def _record(hub, mode: str, metrics) -> None:
    for key, value in (metrics or {}).items():
        if _is_scalar(value):
            hub.update_scalar(f'{mode}/{key}', value)
        else:
            hub.update_info(f'{mode}/{key}', value)


def _is_scalar(value) -> bool:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    numel = getattr(value, 'numel', None)
    size = getattr(value, 'size', None)
    if callable(numel):  # a tensor
        return numel() == 1
    return isinstance(size, int) and size == 1 and hasattr(value, 'dtype')  # a numpy scalar/array
