"""Experiment trackers (wandb, TensorBoard, MLflow, ...) on Accelerate's tracking API.

Configured as a top-level list, one dict per tracker, with Accelerate's tracker names::

    trackers = [dict(type='wandb', project='spiral', init_kwargs=dict(tags=['mlp'])),
                dict(type='tensorboard')]

Keys: ``type`` (an Accelerate tracker name, a ``TRACKERS`` registry name or a
``GeneralTracker`` subclass), ``project`` (default: the work dir's name), ``init_kwargs``
(passed to the tracker: ``wandb.init``, ``SummaryWriter``, ``mlflow``...), ``logging_dir``
(trackers that write files: default ``work_dir/<type>``). A built ``GeneralTracker`` may be
given instead of a dict.

The LoggerHook drives them: it checks the packages at start (every rank, so no rank hangs),
creates the trackers on the main process only once the Accelerator exists (appending them to
``accelerator.trackers``, as ``Accelerator.init_trackers`` does), logs the resolved config as
hyper-parameters, logs with ``accelerator.log(values, step=train_iter)`` and finishes them at
the end of the run. Across a resume, the wandb run id and the TensorBoard run directory travel
in the checkpoint, so the resumed run continues the same run and step sequence.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from .errors import ConfigError, closest

# Accelerate's tracker name -> (module to import, pip install line)
PACKAGES = {
    'wandb': ('wandb', "pip install wandb  (or pip install 'scale_runner[wandb]')"),
    'tensorboard': ('tensorboard',
                    "pip install tensorboard  (or pip install 'scale_runner[tensorboard]')"),
    'mlflow': ('mlflow', 'pip install mlflow'),
    'comet_ml': ('comet_ml', 'pip install comet_ml'),
    'aim': ('aim', 'pip install aim'),
    'clearml': ('clearml', 'pip install clearml'),
    'dvclive': ('dvclive', 'pip install dvclive'),
    'swanlab': ('swanlab', 'pip install swanlab'),
    'trackio': ('trackio', 'pip install trackio'),
}
KEYS = ('type', 'project', 'init_kwargs', 'logging_dir')


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except (ImportError, ValueError):  # a parent package missing, or sys.modules[name] = None
        return True


def check_trackers(cfgs: Any) -> list:
    """Validate the ``trackers`` list; a missing package fails here with its pip line."""
    if cfgs is None:
        return []
    if isinstance(cfgs, (dict, str)) or not isinstance(cfgs, (list, tuple)):
        cfgs = [cfgs]
    out = []
    for i, cfg in enumerate(cfgs):
        where = f'trackers[{i}]'
        if isinstance(cfg, str):
            cfg = dict(type=cfg)
        if not isinstance(cfg, dict):
            if _is_tracker(cfg):
                out.append(cfg)
                continue
            raise ConfigError(f'{where} must be dict(type=...) or an accelerate GeneralTracker, '
                              f'got {cfg!r}')
        cfg = dict(cfg)
        unknown = [k for k in cfg if k not in KEYS]
        if unknown:
            near = closest(unknown[0], KEYS, n=1)
            hint = f' Did you mean {where}.{near[0]}?' if near else ''
            raise ConfigError(f'{where}.{unknown[0]} is not a tracker setting.{hint} Valid: '
                              f'{", ".join(KEYS)} (tracker arguments go in init_kwargs)')
        if 'type' not in cfg:
            raise ConfigError(f"{where} has no type: use one of {', '.join(PACKAGES)}")
        if not isinstance(cfg.get('init_kwargs') or {}, dict):
            raise ConfigError(f'{where}.init_kwargs must be a dict, got {cfg["init_kwargs"]!r}')
        _tracker_class(cfg['type'], where)
        name = cfg['type'] if isinstance(cfg['type'], str) else getattr(cfg['type'], 'name', '')
        if name in PACKAGES and _missing(PACKAGES[name][0]):
            raise ConfigError(f"{where}.type={name!r} needs the {PACKAGES[name][0]} package, which "
                              f"is not installed. Fix: {PACKAGES[name][1]}")
        out.append(cfg)
    return out


def _is_tracker(obj) -> bool:
    from accelerate.tracking import GeneralTracker
    return isinstance(obj, GeneralTracker)


def _tracker_class(kind: Any, where: str):
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
    from .registry import TRACKERS
    if isinstance(kind, type) and issubclass(kind, GeneralTracker):
        return kind
    if isinstance(kind, str) and kind in TRACKERS:
        return TRACKERS.get(kind)
    if isinstance(kind, str) and kind in LOGGER_TYPE_TO_CLASS:
        return LOGGER_TYPE_TO_CLASS[kind]
    names = sorted(set(LOGGER_TYPE_TO_CLASS) | set(TRACKERS.keys()))
    near = closest(str(kind), names, n=1)
    hint = f' Did you mean {near[0]!r}?' if near else ''
    raise ConfigError(f'{where}.type={kind!r} is not a tracker.{hint} Valid: {", ".join(names)} '
                      f'(or a GeneralTracker subclass registered in TRACKERS)')


def flat_config(cfg: Any) -> dict:
    """The resolved config as ``{'a.b.c': scalar}`` (what every tracker accepts as hparams)."""
    if cfg is None:
        return {}
    data = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
    out: dict = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f'{prefix}.{k}' if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = repr(value) if not isinstance(value, (list, tuple, dict)) else str(value)

    for key, value in data.items():
        if not str(key).startswith('_'):
            walk(str(key), value)
    return out


class Trackers:
    """The trackers of one runner: built on the main process, resumable (see module doc)."""

    def __init__(self, cfgs: Any):
        self.cfgs = check_trackers(cfgs)
        self.active: list = []
        self.run_name: str | None = None   # TensorBoard run dir / wandb name of the first run
        self.wandb_id: str | None = None

    def __bool__(self) -> bool:
        return bool(self.cfgs)

    def start(self, runner) -> None:
        """Create and start every tracker (main process only); idempotent."""
        acc = runner.accelerator
        if self.active or not self.cfgs or not acc.is_main_process:
            return
        if self.run_name is None:
            self.run_name = runner.experiment_name
        project = runner.work_dir.name
        for i, cfg in enumerate(self.cfgs):
            tracker = cfg if _is_tracker(cfg) else self._build(cfg, i, runner, project)
            tracker.start()
            self.active.append(tracker)
            if getattr(tracker, 'name', None) == 'wandb':
                self.wandb_id = tracker.run.id
        hparams = flat_config(runner.cfg)
        if hparams:
            for tracker in self.active:
                tracker.store_init_configuration(hparams)
        acc.trackers.extend(self.active)

    def _build(self, cfg: dict, i: int, runner, project: str):
        cls = _tracker_class(cfg['type'], f'trackers[{i}]')
        kwargs = dict(cfg.get('init_kwargs') or {})
        name = getattr(cls, 'name', '')
        project = cfg.get('project') or project
        if name == 'wandb':
            kwargs.setdefault('dir', str(runner.work_dir))
            if self.wandb_id is not None:  # a resumed run: continue the same wandb run
                kwargs.setdefault('id', self.wandb_id)
                kwargs.setdefault('resume', 'allow')
            else:
                kwargs.setdefault('name', self.run_name)
            return cls(project, **kwargs)
        if name == 'tensorboard':  # writes to logging_dir/<run name>: the same dir when resumed
            log_dir = Path(cfg.get('logging_dir') or runner.work_dir / 'tensorboard')
            return cls(self.run_name, log_dir, **kwargs)
        if getattr(cls, 'requires_logging_directory', False):
            return cls(project, str(cfg.get('logging_dir') or runner.work_dir / str(name or i)), **kwargs)
        return cls(project, **kwargs)

    def log(self, runner, values: dict, step: int) -> None:
        if self.active:
            runner.accelerator.log(values, step=step)

    def finish(self, runner) -> None:
        """Finish our trackers (``Accelerator.end_training`` minus its process-group teardown,
        which would break a following ``runner.test()`` under DDP)."""
        acc = runner.accelerator
        for tracker in self.active:
            try:
                tracker.finish()
            finally:
                if acc is not None and tracker in acc.trackers:
                    acc.trackers.remove(tracker)
        self.active = []

    def state_dict(self) -> dict:
        return {'run_name': self.run_name, 'wandb_id': self.wandb_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_name = state.get('run_name') or self.run_name
        self.wandb_id = state.get('wandb_id') or self.wandb_id
