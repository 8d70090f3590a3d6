"""ProfilerHook: torch.profiler over the first epochs / iterations, traces in the work dir."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ConfigError
from ..registry import HOOKS
from .hook import Hook


@HOOKS.register_module()
class ProfilerHook(Hook):
    """MMEngine's ``ProfilerHook`` on ``torch.profiler``: profiles the first ``profile_times``
    epochs (``by_epoch=True``) or iterations of training, stepping the profiler every iteration.

    - ``schedule``: ``dict(wait=, warmup=, active=, repeat=, skip_first=)`` for
      ``torch.profiler.schedule`` (``None``: record everything until the profiler stops).
    - ``on_trace_ready``: ``None`` (default) writes a Chrome trace
      ``<log_dir>/profiler/trace_rank<R>_<N>.json`` (open in chrome://tracing or Perfetto);
      ``dict(type='tb_trace', dir_name=None)`` writes TensorBoard traces (``*.pt.trace.json``,
      torch-tb-profiler) to ``dir_name`` or ``<log_dir>/profiler``;
      ``dict(type='log_trace', sort_by='cpu_time_total', row_limit=10)`` logs a table;
      a callable is passed to torch as it is.
    - ``json_trace_path``: also export the whole recording to this Chrome trace file at the end.
    - ``activity_with_cpu`` / ``activity_with_cuda``, ``record_shapes``, ``profile_memory``,
      ``with_stack``, ``with_flops``: as in ``torch.profiler.profile``.
    """

    priority = 'VERY_LOW'

    def __init__(self, by_epoch: bool = True, profile_times: int = 1, activity_with_cpu: bool = True,
                 activity_with_cuda: bool = False, schedule: dict | None = None,
                 on_trace_ready=None, record_shapes: bool = False, profile_memory: bool = False,
                 with_stack: bool = False, with_flops: bool = False, json_trace_path: str | None = None):
        if not isinstance(profile_times, int) or isinstance(profile_times, bool) or profile_times < 1:
            raise ConfigError(f'ProfilerHook.profile_times must be a positive int, got {profile_times!r}')
        if schedule is not None and not isinstance(schedule, dict):
            raise ConfigError(f'ProfilerHook.schedule must be dict(wait=, warmup=, active=, repeat=), '
                              f'got {schedule!r}')
        if not (on_trace_ready is None or callable(on_trace_ready) or (
                isinstance(on_trace_ready, dict) and on_trace_ready.get('type') in ('tb_trace', 'log_trace'))):
            raise ConfigError(f"ProfilerHook.on_trace_ready must be None, a callable, "
                              f"dict(type='tb_trace') or dict(type='log_trace'), got {on_trace_ready!r}")
        self.by_epoch = by_epoch
        self.profile_times = profile_times
        self.activities = []
        if activity_with_cpu:
            self.activities.append(torch.profiler.ProfilerActivity.CPU)
        if activity_with_cuda:
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.schedule = schedule
        self.on_trace_ready = on_trace_ready
        self.options = dict(record_shapes=record_shapes, profile_memory=profile_memory,
                            with_stack=with_stack, with_flops=with_flops)
        self.json_trace_path = json_trace_path
        self.profiler = None
        self.trace_files: list[Path] = []
        self._start = 0

    def _handler(self, runner):
        out = runner.log_dir / 'profiler'
        rank = runner.accelerator.process_index
        cfg = self.on_trace_ready
        if callable(cfg):
            return cfg
        if cfg is None:
            def chrome(prof):
                out.mkdir(parents=True, exist_ok=True)
                path = out / f'trace_rank{rank}_{len(self.trace_files)}.json'
                prof.export_chrome_trace(str(path))
                self.trace_files.append(path)
                runner.logger.info(f'profiler trace written to {path}')
            return chrome
        cfg = dict(cfg)
        if cfg.pop('type') == 'tb_trace':
            return torch.profiler.tensorboard_trace_handler(
                str(cfg.pop('dir_name', None) or out), worker_name=f'rank{rank}', **cfg)

        def log_trace(prof):
            runner.logger.info('\n' + prof.key_averages().table(
                sort_by=cfg.get('sort_by', 'cpu_time_total'), row_limit=cfg.get('row_limit', 10)))
        return log_trace

    def before_train(self, runner) -> None:
        schedule = torch.profiler.schedule(**self.schedule) if self.schedule else None
        self.profiler = torch.profiler.profile(activities=self.activities, schedule=schedule,
                                               on_trace_ready=self._handler(runner), **self.options)
        self.profiler.__enter__()
        self._start = runner.epoch if self.by_epoch else runner.iter
        runner.logger.info(f'profiling the first {self.profile_times} '
                           f'{"epoch" if self.by_epoch else "iteration"}(s)')

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.profiler is None:
            return
        self.profiler.step()
        if not self.by_epoch and runner.iter - self._start >= self.profile_times:
            self._stop(runner)

    def after_train_epoch(self, runner) -> None:
        if self.profiler is not None and self.by_epoch and runner.epoch - self._start >= self.profile_times:
            self._stop(runner)

    def after_train(self, runner) -> None:
        self._stop(runner)

    def after_run(self, runner) -> None:
        self._stop(runner)

    def _stop(self, runner) -> None:
        if self.profiler is None:
            return
        prof, self.profiler = self.profiler, None
        prof.__exit__(None, None, None)
        if self.json_trace_path:
            path = Path(self.json_trace_path)
            path.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(path))
            self.trace_files.append(path)
