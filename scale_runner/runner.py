"""``Runner``: builds what an entry point needs, lazily, and drives its loop with hooks."""
from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any

import torch

from .checkpoint import (CheckpointWriter, candidates, collect_state,
                         find_resumable, load_weights, read_checkpoint, resolve_resume,
                         restore_state, whole_weights)
from .config import Config
from .errors import ConfigError, closest, edit_distance
from .hooks.hook import STAGES, Hook, bind_point, bind_positional, check_hook_points, get_priority
from .logs import LogBuffer, close_logger, make_logger
from .registry import HOOKS, LOOPS, MODELS, RUNNERS
from .state import TrainState

DEFAULT_HOOKS = {
    'runtime_info': dict(type='RuntimeInfoHook'),  # fills runner.message_hub (MMEngine's)
    'timer': dict(type='IterTimerHook'),
    'sampler_seed': dict(type='DistSamplerSeedHook'),
    'logger': dict(type='LoggerHook'),
    'param_scheduler': dict(type='ParamSchedulerHook'),
    'checkpoint': dict(type='CheckpointHook'),
    'nan_guard': dict(type='NanGuardHook'),  # a NaN/Inf loss stops every rank (or mode='skip')
}
# What each entry point needs: (dataloader, loop config, evaluator or optimizer).
NEEDS = {'train': ('train_dataloader', 'train_cfg', 'optim_wrapper'),
         'val': ('val_dataloader', 'val_cfg', 'val_evaluator'),
         'test': ('test_dataloader', 'test_cfg', 'test_evaluator')}


@RUNNERS.register_module()
class Runner:
    """MMEngine's runner on Hugging Face Accelerate. Every argument is a config dict or a
    built object; nothing of train/val/test is built until that entry point runs."""

    def __init__(self, model, work_dir, train_dataloader=None, val_dataloader=None,
                 test_dataloader=None, train_cfg=None, val_cfg=None, test_cfg=None,
                 optim_wrapper=None, param_scheduler=None, val_evaluator=None, test_evaluator=None,
                 default_hooks=None, custom_hooks=None, load_from=None, resume=False,
                 accelerator=None, randomness=None, experiment_name=None, log_level='INFO',
                 trackers=None, launcher='none', env_cfg=None, log_processor=None, cfg=None):
        if model is None:
            raise ConfigError('model is required: a module or dict(type=..., ...) from MODELS')
        self.cfg = cfg if cfg is None or isinstance(cfg, Config) else Config(cfg)
        self.work_dir = Path(work_dir).expanduser().resolve()
        self._parts = dict(train_dataloader=train_dataloader, val_dataloader=val_dataloader,
                           test_dataloader=test_dataloader, train_cfg=train_cfg, val_cfg=val_cfg,
                           test_cfg=test_cfg, optim_wrapper=optim_wrapper, val_evaluator=val_evaluator,
                           test_evaluator=test_evaluator)
        self._model_cfg = model
        self._param_scheduler_cfg = param_scheduler
        self._default_hooks_cfg = default_hooks
        self._custom_hooks_cfg = custom_hooks
        from .launcher import accelerator_with_dist, check_env_cfg, check_launcher
        from .log_processor import build_log_processor
        from .message_hub import MessageHub
        self.launcher = check_launcher(launcher)
        self._env_cfg = check_env_cfg(env_cfg)
        self._accelerator_cfg = accelerator_with_dist(accelerator, self._env_cfg)
        self._randomness_cfg = randomness
        self.log_processor = build_log_processor(log_processor)
        if resume is True and load_from is not None:
            # MMEngine resumes from load_from then; silently ignoring it would surprise
            import warnings
            warnings.warn(f'resume=True with load_from={load_from!r}: resuming from load_from, '
                          f"as MMEngine does (resume='auto' would use the latest checkpoint of "
                          f'work_dir and load_from only on a first run)', stacklevel=2)
            resume = load_from
        from .elastic import resume_on_restart
        self._resume = resume_on_restart(resolve_resume(resume), self.checkpoint_dir)
        if experiment_name is not None and not isinstance(experiment_name, str):
            raise ConfigError(f'experiment_name = {experiment_name!r} is not valid: it takes a string '
                              f'(the run directory name under work_dir) or None (a timestamp)')
        self.load_from = load_from
        self.experiment_name = experiment_name
        self.log_level = log_level
        self.trackers = trackers  # experiment trackers: see trackers.py (used by LoggerHook)
        self.state = TrainState()
        self.message_hub = MessageHub(f'runner_{id(self)}', self.state)  # this runner's, no global
        self.log_buffer = LogBuffer()
        self.accelerator = self.logger = self.seed = None
        self.model = model if not isinstance(model, dict) else None
        self.optim_wrapper = None
        self.param_schedulers: list = []
        self.best_scores: dict = {}  # published by CheckpointHook(save_best=...)
        self.train_loop = self.val_loop = self.test_loop = None
        self.loaded_checkpoint_state: dict | None = None  # the state part of load_from's checkpoint
        self._pending_checkpoint = None  # a background save in flight (async_save)
        self._checkpoint_groups = None   # its process groups: (writer's, polls')
        self._snapshot_buffers = None    # the last background save's host copy, reused
        self._hooks: list = []
        self._hook_names: dict[int, str] = {}  # id(hook) -> its name in checkpoints
        self._hook_cache: dict = {}  # point name (or hook_calls' key) -> what it calls
        self._prepared_model = False
        self._hooks_registered = False

    # ---- construction from config ------------------------------------------------------------
    @classmethod
    def from_cfg(cls, cfg: dict | Config) -> 'Runner':
        cfg = cfg if isinstance(cfg, Config) else Config(cfg)
        from .registry import check_data_types  # a .yaml/.json config is data: refuse an unsafe
        check_data_types(cfg)                   # dotted type before anything is built
        names = [p for p in inspect.signature(cls.__init__).parameters if p not in ('self', 'cfg')]
        for key in cfg:
            if key in names or key.startswith('_') or key in ('runner_type', 'custom_imports'):
                continue
            near = [n for n in names if edit_distance(key, n) <= (1 if len(n) <= 5 else 2)]
            if near:
                raise ConfigError(f'top-level config key {key!r} is not a runner argument: did you '
                                  f'mean {near[0]!r}? (rename it, or prefix a helper variable with _)')
        if 'work_dir' not in cfg:
            raise ConfigError('work_dir is not set: add work_dir=... to the config or pass --work-dir')
        return cls(**{k: cfg[k] for k in names if k in cfg}, cfg=cfg)

    # ---- counters (one state object, see TrainState) -------------------------------------------
    epoch = property(lambda self: self.state.epoch)
    iter = property(lambda self: self.state.iter)
    inner_iter = property(lambda self: self.state.inner_iter)
    max_epochs = property(lambda self: self.state.max_epochs)
    max_iters = property(lambda self: self.state.max_iters)
    checkpoint_dir = property(lambda self: self.work_dir / 'checkpoints')
    # MMEngine's names for the built dataloaders (None until their loop is built).
    train_dataloader = property(lambda self: getattr(self.train_loop, 'dataloader', None))
    val_dataloader = property(lambda self: getattr(self.val_loop, 'dataloader', None))
    test_dataloader = property(lambda self: getattr(self.test_loop, 'dataloader', None))

    # ---- environment ------------------------------------------------------------------------
    def setup_env(self) -> None:
        """Create the Accelerator (distributed init) and seed every RNG."""
        from .env import build_accelerator, check_randomness, enable_flight_recorder, set_randomness
        randomness = check_randomness(self._randomness_cfg)
        enable_flight_recorder(self.work_dir)
        optim = self._parts['optim_wrapper']
        counts = (optim.get('accumulative_counts', 1) if isinstance(optim, dict)
                  else getattr(optim, 'accumulative_counts', 1))
        self.accelerator = build_accelerator(self._accelerator_cfg, counts)
        self.seed = set_randomness(self.accelerator, **randomness)

    def _setup(self) -> None:
        """Work dir, environment, logging, model and hooks: done once, by the first entry point."""
        if self.accelerator is not None:
            return
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.setup_env()
        acc = self.accelerator
        from .launcher import apply_env_cfg
        if acc.num_processes > 1:  # so a finished script under torchrun cannot abort at exit
            from .shutdown import register_drain
            register_drain()
        if self.experiment_name is None:
            from .collective import from_main
            self.experiment_name = from_main(_fresh_name(self.work_dir, time.strftime('%Y%m%d_%H%M%S')))
        self.log_dir = self.work_dir / self.experiment_name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_dir / (f'{self.experiment_name}.log' if acc.is_main_process
                                   else f'{self.experiment_name}.rank{acc.process_index}.log')
        self.logger = make_logger(f'{self.experiment_name}.{id(self)}', log_file, self.log_level,
                                  acc.is_main_process)
        self.logger.info(f'distributed: {acc.distributed_type}, processes: {acc.num_processes}, '
                         f'device: {acc.device}, precision: {acc.mixed_precision}, seed: {self.seed}')
        if self.cfg is not None and acc.is_main_process:
            self.cfg.dump(self.log_dir / 'config.py')
        apply_env_cfg(self._env_cfg, self.launcher, acc, self.logger)
        if self.model is None:
            self.model = MODELS.build(self._model_cfg, _cfg_path='model')
        self.register_hooks(self._default_hooks_cfg, self._custom_hooks_cfg)

    def _require(self, mode: str) -> None:
        missing = [k for k in NEEDS[mode] if self._parts[k] is None]
        if missing:
            raise ConfigError(f'{mode}() needs {", ".join(NEEDS[mode])}; missing: '
                              f'{", ".join(missing)}. Add them to the config (or the Runner call).')

    def _prepare_model(self, *extra):
        if not self._prepared_model:
            self._load_weights()
            from .fsdp import prepare_sharded  # accelerator.fsdp: FSDP2 on any device, or a log line
            out = prepare_sharded(self.accelerator, self.model, *extra, logger=self.logger)
            if out is None:
                out = self.accelerator.prepare(self.model, *extra)
            self.model, extra = (out[0], out[1:]) if extra else (out, ())
            if self.accelerator.distributed_type == 'DEEPSPEED':
                from .model import cast_inputs_to_weights
                cast_inputs_to_weights(self.model)
            self._prepared_model = True
        elif extra:
            extra = self.accelerator.prepare(*extra)
            extra = extra if isinstance(extra, tuple) else (extra,)
        return extra

    # ---- builders ---------------------------------------------------------------------------
    def build_dataloader(self, cfg: Any, where: str = 'dataloader'):
        """Build a dataloader from a config dict and shard it with the Accelerator."""
        from .data import build_dataloader
        loader = build_dataloader(cfg, seed=self.seed or 0, where=where,
                                  rank=self.accelerator.process_index if self.accelerator else 0)
        acc = self.accelerator
        if acc is None or (acc.num_processes == 1 and acc.device.type == 'cpu'
                           and isinstance(loader, torch.utils.data.DataLoader)):
            # One CPU process: nothing to shard or move, and Accelerate's loader wrapper would
            # only add per-batch work (a device transfer, a one-batch read-ahead).
            return loader
        return acc.prepare(loader)

    def build_evaluator(self, cfg: Any, where: str = 'evaluator'):
        from .evaluation import build_evaluator
        evaluator = build_evaluator(cfg, where)
        if self.accelerator is not None:
            evaluator.bind(self.accelerator)
        return evaluator

    def build_train_loop(self, cfg: Any):
        if not isinstance(cfg, dict):
            return cfg
        cfg = dict(cfg)
        if 'by_epoch' in cfg and not isinstance(cfg['by_epoch'], bool):
            raise ConfigError(f'train_cfg.by_epoch = {cfg["by_epoch"]!r} is not valid: it takes True '
                              f'(EpochBasedTrainLoop) or False (IterBasedTrainLoop)')
        if 'type' not in cfg:
            by_epoch = cfg.pop('by_epoch', 'max_iters' not in cfg and not _near_max_iters(cfg))
            cfg['type'] = 'EpochBasedTrainLoop' if by_epoch else 'IterBasedTrainLoop'
        else:
            cfg.pop('by_epoch', None)
        loader = self.build_dataloader(self._parts['train_dataloader'], 'train_dataloader')
        return LOOPS.build(cfg, _cfg_path='train_cfg', _cfg_extra_keys=('by_epoch',), runner=self,
                           dataloader=loader)

    def build_eval_loop(self, mode: str):
        cfg = self._parts[f'{mode}_cfg']
        if not isinstance(cfg, dict):
            return cfg
        cfg = dict(cfg)
        cfg.setdefault('type', 'ValLoop' if mode == 'val' else 'TestLoop')
        loader = self.build_dataloader(self._parts[f'{mode}_dataloader'], f'{mode}_dataloader')
        evaluator = self.build_evaluator(self._parts[f'{mode}_evaluator'], f'{mode}_evaluator')
        return LOOPS.build(cfg, _cfg_path=f'{mode}_cfg', runner=self, dataloader=loader,
                           evaluator=evaluator)

    # ---- entry points -------------------------------------------------------------------------
    def train(self) -> dict:
        """Train; return the last validation metrics (``{}`` without validation)."""
        self._require('train')
        val_parts = [self._parts[k] is not None for k in NEEDS['val']]
        if any(val_parts) and not all(val_parts):
            missing = [k for k, ok in zip(NEEDS['val'], val_parts) if not ok]
            raise ConfigError(f'validation during training needs {", ".join(NEEDS["val"])}; missing: '
                              f'{", ".join(missing)} (or remove the others to train without it)')
        self._setup()
        from .optim import build_optim_wrapper, fused_on_gpu, updates_per_epoch
        from .optim_wrapper_dict import wrappers_of
        from .schedulers import build_schedulers_for
        self.train_loop = self.build_train_loop(self._parts['train_cfg'])
        self.optim_wrapper = build_optim_wrapper(fused_on_gpu(self._parts['optim_wrapper'], self.accelerator),
                                                 self.model)
        self.optim_wrapper.train_state = self.state  # its accumulation window is counted here
        self.param_schedulers = build_schedulers_for(
            self._param_scheduler_cfg, self.optim_wrapper,
            updates_per_epoch(self.optim_wrapper, _safe_len(self.train_loop.dataloader)))
        from .env import check_train_setup  # same batch count on every rank; DeepSpeed 'auto's
        check_train_setup(self.accelerator, self.train_loop.dataloader, self.optim_wrapper)
        wrappers = wrappers_of(self.optim_wrapper)  # one, or each of an OptimWrapperDict
        for wrapper, optimizer in zip(wrappers, self._prepare_model(*[w.optimizer for w in wrappers])):
            wrapper.optimizer = optimizer
        self.optim_wrapper.bind(self.accelerator, self.model)
        if all(val_parts) and self.val_loop is None:
            self.val_loop = self.build_eval_loop('val')
        self._hook_cache.clear()  # a hook may implement a point or not depending on this run
        self.call_hook('before_run')
        try:
            self._resume_if_asked()
            # MMEngine's call, for wrappers that count their own window (ours reads self.state)
            self.optim_wrapper.initialize_count_status(self.model, self.state.iter, self.state.max_iters)
            from .watchdog import watch  # no rank waits silently for a stuck one
            with watch(self, self._accelerator_cfg.get('timeout') if isinstance(self._accelerator_cfg, dict)
                       else None):
                self.train_loop.run()
            return self.train_loop.last_val_metrics
        finally:
            try:
                self.wait_checkpoint()  # the end, an exception or a preemption: never lost
            finally:
                self.call_hook('after_run')

    def val(self) -> dict:
        return self._evaluate('val')

    def test(self) -> dict:
        return self._evaluate('test')

    def _evaluate(self, mode: str) -> dict:
        self._require(mode)
        self._setup()
        self._prepare_model()
        loop = getattr(self, f'{mode}_loop') or self.build_eval_loop(mode)
        setattr(self, f'{mode}_loop', loop)
        self.call_hook('before_run')
        try:
            return loop.run()
        finally:
            self.call_hook('after_run')

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike, save_optimizer: bool = True,
                        save_param_scheduler: bool = True, async_save: bool = False,
                        then=None) -> Path:
        """Write a checkpoint directory (collective: every rank calls it), then call ``then``
        (retention). ``async_save``: return once the state is copied to host memory and write
        it in the background (see ``checkpoint/async_save.py``); a save in flight is waited
        for first, so at most one is."""
        self.wait_checkpoint()
        parts = collect_state(self, save_optimizer, save_param_scheduler)
        self.call_hook('before_save_checkpoint', checkpoint=parts[1])
        path = Path(path)
        if async_save:
            from .checkpoint.async_save import AsyncCheckpoint, snapshot
            if self._checkpoint_groups is None:  # the writer's and the polls': gloo, collective
                from .collective import background_groups
                self._checkpoint_groups = background_groups()
            copy = snapshot(parts, self._snapshot_buffers)  # into the last save's host memory
            self._pending_checkpoint = AsyncCheckpoint(self.accelerator, self._checkpoint_groups[0],
                                                       path, copy, then)
            self.logger.info(f'saving checkpoint {path} in the background')
            return path
        CheckpointWriter(self.accelerator).write(path, *parts)
        if then is not None:
            then()
        self.logger.info(f'saved checkpoint {path}')
        return path

    def poll_checkpoint(self) -> None:
        """At an iteration boundary: finish a background save that every rank completed
        (raising its error on every rank if it failed)."""
        pending = self._pending_checkpoint
        if pending is not None and pending.poll(self._checkpoint_groups[1]):
            self.wait_checkpoint()

    def wait_checkpoint(self) -> None:
        """Wait for the background save in flight, if any; raise its error."""
        pending, self._pending_checkpoint = self._pending_checkpoint, None
        if pending is not None:
            pending.wait()
            self._snapshot_buffers = pending.parts  # written: the next snapshot copies into it
            self.logger.info(f'saved checkpoint {pending.path} (written in the background in '
                             f'{pending.seconds:.2f} s)')

    def load_checkpoint(self, path: str | os.PathLike, strict: bool = True) -> None:
        """Load model weights (``load_from``): from a checkpoint directory (verified; a sharded
        one is put together) or a ``.safetensors`` file. A checkpoint's saved state (its hooks'
        states: an EMA average, ...) is kept in ``loaded_checkpoint_state`` for hooks that use
        it (:meth:`loaded_hook_state`); nothing else of it is restored (that is ``resume``)."""
        from .checkpoint import read_model_weights
        from .model import unwrap
        path = Path(path)
        if path.is_dir() and (path / 'state.json').is_file():
            ckpt = read_checkpoint(path, self.accelerator.process_index if self.accelerator else 0)
            weights = whole_weights(ckpt)
            # Hooks' states and counters; not the optimizer's or the schedulers': load_from
            # starts a new run, and nothing should hold on to them.
            self.loaded_checkpoint_state = {k: v for k, v in ckpt['state'].items()
                                            if k in ('meta', 'train_state') or k.startswith('hooks.')}
        else:
            weights = read_model_weights(path)
        load_weights(unwrap(self.model), weights, str(path), strict)
        self.logger.info(f'loaded weights from {path}')

    def _load_weights(self) -> None:
        if self.load_from is not None and not self._resuming():
            self.load_checkpoint(self.load_from)

    def _resuming(self) -> bool:
        # 'auto' with no checkpoint directory at all is a first run; damaged ones still raise.
        return bool(self._resume) and (self._resume != 'auto' or bool(candidates(self.checkpoint_dir)))

    def _resume_if_asked(self) -> None:
        if not self._resuming():
            if self._resume == 'auto':
                self.logger.info(f'resume=auto: no checkpoint in {self.checkpoint_dir} yet, starting fresh')
            return
        rank = self.accelerator.process_index
        if self._resume in (True, 'auto'):
            ckpt = find_resumable(self.checkpoint_dir, rank)
        else:
            ckpt = read_checkpoint(self._resume, rank)
        restore_state(self, ckpt)
        self.call_hook('after_load_checkpoint', checkpoint=ckpt['state'])
        from .elastic import restart_count
        restart = f' (restart {restart_count()} by the launcher)' if restart_count() else ''
        self.logger.info(f'resumed from {ckpt["path"]} at epoch {self.epoch}, iter {self.iter}{restart}')

    # ---- hooks --------------------------------------------------------------------------------
    def register_hook(self, hook: Any, priority: int | str | None = None,
                      where: str = 'custom_hooks') -> None:
        """Add a hook (or a hook config dict); equal priorities keep registration order."""
        if isinstance(hook, dict):
            hook = dict(hook)
            priority = hook.pop('priority', priority)
            hook = HOOKS.build(hook, _cfg_path=where, _cfg_extra_keys=('priority',))
        if not isinstance(hook, Hook):
            raise ConfigError(f'{where}: a hook must be a Hook instance or dict(type=...), got '
                              f'{hook!r} ({type(hook).__name__})')
        check_hook_points(hook)
        self._hook_names[id(hook)] = self._hook_name(hook, where)
        hook.priority = get_priority(hook.priority if priority is None else priority,
                                     f'{where}.priority' if priority is not None
                                     else f'{type(hook).__name__}.priority')
        pos = len(self._hooks)
        while pos and self._hooks[pos - 1].priority > hook.priority:
            pos -= 1
        self._hooks.insert(pos, hook)
        self._hook_cache.clear()

    def _hook_name(self, hook, where: str) -> str:
        if where.startswith('default_hooks.'):
            return where[len('default_hooks.'):]
        taken = set(self._hook_names.values())
        name, i = type(hook).__name__, 1
        while name in taken:
            i += 1
            name = f'{type(hook).__name__}_{i}'
        return name

    def register_hooks(self, default_hooks: dict | None = None, custom_hooks: list | None = None) -> None:
        if self._hooks_registered:
            return
        self._hooks_registered = True
        merged = dict(DEFAULT_HOOKS)
        if default_hooks is not None and not isinstance(default_hooks, dict):
            raise ConfigError(f'default_hooks = {default_hooks!r} is not valid: it takes a dict '
                              f'of hooks by name, e.g. default_hooks=dict(logger=dict(interval=10))')
        if custom_hooks is not None and not isinstance(custom_hooks, (list, tuple)):
            raise ConfigError(f'custom_hooks = {custom_hooks!r} is not valid: it takes a list, '
                              f"e.g. custom_hooks=[dict(type='EMAHook')]")
        for name, cfg in (default_hooks or {}).items():
            if cfg is None:
                merged.pop(name, None)
            elif isinstance(cfg, dict) and 'type' not in cfg:
                if name not in DEFAULT_HOOKS:
                    near = closest(str(name), DEFAULT_HOOKS, n=1)
                    did = f' Did you mean default_hooks.{near[0]}?' if near else ''
                    raise ConfigError(f'default_hooks.{name} has no type and is not a default hook '
                                      f'({", ".join(DEFAULT_HOOKS)}):{did} Or add type=... '
                                      f'to make it a hook of its own.')
                merged[name] = {**DEFAULT_HOOKS[name], **cfg}
            else:
                merged[name] = cfg
        for name, cfg in merged.items():
            self.register_hook(cfg, where=f'default_hooks.{name}')
        for i, cfg in enumerate(custom_hooks or []):
            self.register_hook(cfg, where=f'custom_hooks[{i}]')

    @property
    def hooks(self) -> list:
        return list(self._hooks)

    def get_hook(self, name: str):
        return next((h for h in self._hooks if type(h).__name__ == name), None)

    def named_hooks(self) -> list[tuple[str, Any]]:
        """``(name, hook)`` in priority order; the name is the hook's key in checkpoints: its
        ``default_hooks`` name, or its class name (``<class>_2``, ... for repeats)."""
        return [(self._hook_names[id(h)], h) for h in self._hooks]

    def loaded_hook_state(self, hook) -> dict | None:
        """The state ``load_from``'s checkpoint holds for ``hook``, if any."""
        state = self.loaded_checkpoint_state or {}
        return state.get(f'hooks.{self._hook_names.get(id(hook))}')

    def call_hook(self, fn_name: str, **kwargs) -> None:
        """Call ``fn_name`` on every hook that implements it, in priority order."""
        try:  # a subscript, not a .get() call: this runs twice per step
            fns = self._hook_cache[fn_name]
        except KeyError:
            fns = self._hook_cache[fn_name] = [bind_point(h, fn_name, self) for h in self._hooks
                                               if h.overrides(fn_name)]
        for fn in fns:
            fn(**kwargs)

    call_hooks = call_hook

    def hook_calls(self, point: tuple) -> list:
        """What ``call_hook`` calls for ``point = (fn_name, names)``, each taking the values of
        ``names`` positionally (the loops' per-iteration points: no keyword dicts per step)."""
        try:
            return self._hook_cache[point]
        except KeyError:
            fn_name, names = point
            fns = self._hook_cache[point] = [bind_positional(h, fn_name, self, names)
                                             for h in self._hooks if h.overrides(fn_name)]
            return fns

    def get_hooks_info(self) -> str:
        """A table of the hooks that run at each stage, in order, with priorities."""
        from .hooks.hook import PRIORITIES
        self.register_hooks(self._default_hooks_cfg, self._custom_hooks_cfg)
        names = {v: k for k, v in PRIORITIES.items()}
        lines = []
        for stage in STAGES:
            hooks = [h for h in self._hooks if h.overrides(stage)]
            if hooks:
                lines.append(f'{stage}:')
                lines += [f'  ({names.get(h.priority, h.priority):<12}) {type(h).__name__}'
                          for h in hooks]
        return '\n'.join(lines)

    def close(self) -> None:
        if self.logger is not None:
            close_logger(self.logger)

    def __enter__(self) -> 'Runner':
        return self

    def __exit__(self, *exc) -> None:  # ``with Runner(...) as r:`` closes the log handlers
        self.close()


def _fresh_name(work_dir: Path, stamp: str) -> str:
    """``stamp``, or ``stamp_1``, ``stamp_2``... if a run of the same second already has it."""
    name, i = stamp, 0
    while (work_dir / name).exists():
        i += 1
        name = f'{stamp}_{i}'
    return name


def _near_max_iters(train_cfg: dict) -> bool:
    """A key that looks like a misspelt ``max_iters`` (and not ``max_epochs``): the loop is then
    iteration-based, so the error names the misspelling and ``max_iters``."""
    if 'max_epochs' in train_cfg:
        return False
    return any(isinstance(k, str) and edit_distance(k, 'max_iters') <= 2
               and edit_distance(k, 'max_iters') < edit_distance(k, 'max_epochs') for k in train_cfg)


def _safe_len(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None
