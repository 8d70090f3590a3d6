"""Registries: thin name -> object maps that build objects from config dicts."""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable, Iterable

from .errors import ConfigError, closest


class Registry:
    """A name -> class/function map.

    ``locations`` are modules imported on first lookup, so built-in entries register
    themselves without ``import scale_runner`` importing torch. ``populate`` is called
    once on first lookup (used to pre-register every ``torch.optim`` optimizer).
    """

    def __init__(self, name: str, locations: Iterable[str] = (),
                 populate: Callable[['Registry'], None] | None = None,
                 build_func: Callable[..., Any] | None = None):
        self.name = name
        self._build_func = build_func
        self._modules: dict[str, Any] = {}
        self._locations = tuple(locations)
        self._populate = populate
        self._loaded = not self._locations and populate is None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True  # set first: a location module registers into this registry
        try:
            for loc in self._locations:
                importlib.import_module(loc)
            if self._populate is not None:
                self._populate(self)
        except BaseException:
            self._loaded = False  # retry (and fail loudly) on the next lookup
            raise

    def __len__(self) -> int:
        self._load()
        return len(self._modules)

    def __contains__(self, key: str) -> bool:
        self._load()
        return key in self._modules

    def __repr__(self) -> str:
        return f'Registry({self.name!r}, {len(self)} entries)'

    def keys(self) -> list[str]:
        self._load()
        return sorted(self._modules)

    @property
    def module_dict(self) -> dict[str, Any]:
        self._load()
        return dict(self._modules)

    def register_module(self, name: str | list[str] | None = None, force: bool = False,
                        module: Any = None):
        """Register ``module`` (call form) or return a decorator (decorator form)."""
        if not isinstance(force, bool):
            raise TypeError(f'force must be a bool, got {force!r}')
        if not (name is None or isinstance(name, str)
                or (isinstance(name, (list, tuple)) and all(isinstance(n, str) for n in name))):
            raise TypeError(f'register_module(name=...) takes a str or a list of str, got {name!r}; '
                            f'as a decorator write @{self.name.upper()}S.register_module() '
                            f'(with parentheses)')

        def _register(obj):
            # Load the built-ins first, so a name clash with one is reported here, at the
            # user's registration, and not later while importing the built-in modules.
            self._load()
            names = [obj.__name__] if name is None else ([name] if isinstance(name, str) else list(name))
            for key in names:
                if not force and key in self._modules and self._modules[key] is not obj:
                    raise KeyError(
                        f'{key!r} is already registered in the {self.name!r} registry '
                        f'(as {_qualname(self._modules[key])}); pass force=True to replace it '
                        f'or choose another name')
                self._modules[key] = obj
            return obj

        if module is not None:
            return _register(module)
        return _register

    def get(self, key: Any) -> Any:
        """Resolve ``key``: a registered name, a dotted import path, or the object itself."""
        if not isinstance(key, str):
            return key
        self._load()
        obj = self._modules.get(key)
        if obj is not None:
            return obj
        if '.' in key:
            obj = import_dotted(key)
            if obj is not None:
                return obj
        raise KeyError(self._unknown(key))

    def _unknown(self, key: str) -> str:
        near = closest(key, self._modules, n=5)
        hint = f' Closest registered names: {", ".join(near)}.' if near else ''
        return (f'{key!r} is not in the {self.name!r} registry.{hint} '
                f'Use a dotted import path (e.g. "my_pkg.module.MyClass"), or register it with '
                f'@{self.name.upper()}S.register_module() in a module listed in '
                f"custom_imports=dict(imports=['my_pkg.module']).")

    def build(self, cfg: Any, *, _cfg_path: str | None = None, **default_args) -> Any:
        """Build an object from ``cfg`` (a dict with ``type``) or return it if already built.

        ``_cfg_path`` is the config key path used in error messages (``train_cfg``).
        """
        if not isinstance(cfg, dict) and not hasattr(cfg, 'to_dict'):
            return cfg
        if self._build_func is not None:
            return self._build_func(self, cfg, **default_args)
        args = dict(cfg)
        where = _cfg_path or f'<{self.name} config>'
        if 'type' not in args:
            raise ConfigError(f'{where} needs a "type" key naming an entry of the {self.name!r} '
                              f'registry; got keys {sorted(args)}')
        type_ = args.pop('type')
        try:
            obj = self.get(type_)
        except KeyError as e:
            raise ConfigError(f'{where}.type: {e.args[0]}') from None
        for k, v in default_args.items():
            args.setdefault(k, v)
        return call_with_cfg(obj, args, where)


def call_with_cfg(obj: Callable, kwargs: dict, where: str) -> Any:
    """Call ``obj(**kwargs)``; a rejected keyword becomes an error naming the config key path."""
    try:
        return obj(**kwargs)
    except TypeError:
        try:
            sig = inspect.signature(obj)
        except (TypeError, ValueError):
            raise
        try:
            sig.bind(**kwargs)
        except TypeError as bind_err:
            raise ConfigError(_binding_message(sig, kwargs, where, obj, bind_err)) from None
        raise


def _binding_message(sig, kwargs, where, obj, err) -> str:
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    names = [p.name for p in params]
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    lines = [f'{where}: {_qualname(obj)} does not accept the given arguments ({err}).']
    if not has_var_kw:
        for key in kwargs:
            if key not in names:
                near = closest(key, names, n=1)
                did = f' Did you mean {where}.{near[0]}?' if near else ''
                lines.append(f'  unexpected key {where}.{key} = {kwargs[key]!r}.{did}')
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
               and p.kind != p.POSITIONAL_ONLY]
    if missing:
        lines.append(f'  missing required key(s): {", ".join(where + "." + m for m in missing)}')
    lines.append(f'  accepted parameters: {", ".join(names)}')
    return '\n'.join(lines)


def import_dotted(path: str) -> Any:
    """Import ``'pkg.mod.Name'``; return None if it cannot be resolved."""
    parts = path.split('.')
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _qualname(obj: Any) -> str:
    mod = getattr(obj, '__module__', None)
    name = getattr(obj, '__qualname__', None) or repr(obj)
    return f'{mod}.{name}' if mod else name


def _torch_classes(module_name: str, base_name: str):
    def populate(reg: Registry) -> None:
        mod = importlib.import_module(module_name)
        base = getattr(mod, base_name)
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, base) and obj is not base
                    and not name.startswith('_') and name not in reg._modules):
                reg._modules[name] = obj
    return populate


def _build_runner(registry: Registry, cfg: Any, **default_args) -> Any:
    """Runners are built from a whole config; ``runner_type`` selects the class."""
    runner_type = cfg.get('runner_type') or 'Runner'
    try:
        cls = registry.get(runner_type)
    except KeyError as e:
        raise ConfigError(f'runner_type: {e.args[0]}') from None
    return cls.from_cfg(cfg)


RUNNERS = Registry('runner', locations=['scale_runner.runner'], build_func=_build_runner)
LOOPS = Registry('loop', locations=['scale_runner.loops'])
HOOKS = Registry('hook', locations=['scale_runner.hooks'])
MODELS = Registry('model')
DATASETS = Registry('dataset', locations=['scale_runner.hf_datasets'])
DATA_SAMPLERS = Registry('data_sampler', locations=['scale_runner.data'])
FUNCTIONS = Registry('function', locations=['scale_runner.data'])
OPTIMIZERS = Registry('optimizer', populate=_torch_classes('torch.optim', 'Optimizer'))
OPTIM_WRAPPERS = Registry('optim_wrapper', locations=['scale_runner.optim'])
PARAM_SCHEDULERS = Registry('param_scheduler', locations=['scale_runner.schedulers'],
                            populate=_torch_classes('torch.optim.lr_scheduler', 'LRScheduler'))
METRICS = Registry('metric', locations=['scale_runner.evaluation'])
EVALUATORS = Registry('evaluator', locations=['scale_runner.evaluation'])
TRACKERS = Registry('tracker')

__all__ = ['Registry', 'RUNNERS', 'LOOPS', 'HOOKS', 'MODELS', 'DATASETS', 'DATA_SAMPLERS',
           'FUNCTIONS', 'OPTIMIZERS', 'OPTIM_WRAPPERS', 'PARAM_SCHEDULERS', 'METRICS',
           'EVALUATORS', 'TRACKERS', 'import_dotted', 'call_with_cfg']
