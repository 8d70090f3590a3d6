"""Registries: thin name -> object maps that build objects from config dicts."""
from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
import warnings
from typing import Any, Callable, Iterable

from .config import DataStr, is_stdlib_module
from .errors import ConfigError, UnsafeTypeError, closest, did_you_mean


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
        _REGISTRIES.append(self)

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
                    old = self._modules[key]
                    if _builtin(old) and not _builtin(obj):
                        # MMEngine's tutorial registers its own `Accuracy`: user code may
                        # shadow a built-in name, said once, here.
                        warnings.warn(
                            f'{key!r} in the {self.name!r} registry now names your '
                            f'{_qualname(obj)} instead of the built-in {_qualname(old)}; pass '
                            f'force=True to silence this, or choose another name to keep both',
                            stacklevel=3)
                        self._modules[key] = obj
                        continue
                    if _builtin(obj) and not _builtin(old):
                        continue  # a built-in module loaded after the user's shadow: keep it
                    raise KeyError(
                        f'{key!r} is already registered in the {self.name!r} registry '
                        f'(as {_qualname(self._modules[key])}); pass force=True to replace it '
                        f'or choose another name')
                self._modules[key] = obj
            if module is None and isinstance(getattr(obj, '__module__', None), str):
                # decorator form: the module defines what it registers (a plugin module)
                _REGISTRANT_MODULES.add(obj.__module__)
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
            # A name from a data config (.yaml/.json) resolves under the data-config rules.
            obj = (resolve_data_type(key, self.name) if isinstance(key, DataStr)
                   else import_dotted(key))
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

    def build(self, cfg: Any, *, _cfg_path: str | None = None, _cfg_extra_keys: tuple = (),
              _check: Callable | None = None, _wrap_errors: bool = False, **default_args) -> Any:
        """Build an object from ``cfg`` (a dict with ``type``) or return it if already built.

        ``_cfg_path`` is the config key path used in error messages (``train_cfg``);
        ``_cfg_extra_keys``, ``_check`` and ``_wrap_errors`` go to :func:`call_with_cfg`.
        """
        if not isinstance(cfg, dict) and not hasattr(cfg, 'to_dict'):
            return cfg
        if self._build_func is not None:
            return self._build_func(self, cfg, **default_args)
        args = dict(cfg)
        where = _cfg_path or f'<{self.name} config>'
        if 'type' not in args:
            near = did_you_mean('type', [k for k in args if isinstance(k, str)])
            hint = f' ({where}.{near} is not a key: did you mean {where}.type?)' if near else ''
            raise ConfigError(f'{where} needs a "type" key naming an entry of the {self.name!r} '
                              f'registry; got keys {sorted(args)}{hint}')
        type_ = args.pop('type')
        try:
            obj = self.get(type_)
        except KeyError as e:
            raise ConfigError(f'{where}.type: {e.args[0]}') from None
        internal = tuple(k for k in default_args if k not in args)  # supplied by the runner
        for k, v in default_args.items():
            args.setdefault(k, v)
        return call_with_cfg(obj, args, where, extra_keys=('type',) + tuple(_cfg_extra_keys),
                             internal_keys=internal, check=_check, wrap_errors=_wrap_errors)


def call_with_cfg(obj: Callable, kwargs: dict, where: str, *, extra_keys: Iterable[str] = (),
                  internal_keys: Iterable[str] = (), check: Callable | None = None,
                  wrap_errors: bool = False) -> Any:
    """Call ``obj(**kwargs)``; a rejected keyword becomes an error naming the config key path.

    ``extra_keys``: config keys read before the call (``type``, a hook's ``priority``), valid
    though no parameter, so offered as corrections of a misspelt key. ``internal_keys``:
    arguments the runner supplies (``runner``, ``params``), never offered. ``check(obj, kwargs,
    where)`` validates the user's values (``kwargs`` without the internal ones) before the call.
    With ``wrap_errors`` (objects the runner builds from user values: optimizers, schedulers,
    dataloaders) a ``ValueError`` raised by the call, and a ``TypeError`` raised by a torch
    class, becomes a :class:`ConfigError` naming the key path and the values (the original
    error is chained, shown by ``--debug``).
    """
    extra_keys, internal_keys = tuple(extra_keys), tuple(internal_keys)
    if check is not None or wrap_errors:
        # Bind first: a misspelt key is reported as such, before any value check.
        sig = _signature(obj)
        if sig is not None:
            try:
                sig.bind(**kwargs)
            except TypeError as bind_err:
                raise ConfigError(_binding_message(sig, kwargs, where, obj, bind_err,
                                                   extra_keys, internal_keys)) from None
        if check is not None:
            check(obj, {k: v for k, v in kwargs.items() if k not in internal_keys}, where)
    try:
        return obj(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:
        sig = _signature(obj)
        if sig is None:
            raise
        try:
            sig.bind(**kwargs)
        except TypeError as bind_err:
            raise ConfigError(_binding_message(sig, kwargs, where, obj, bind_err,
                                               extra_keys, internal_keys)) from None
        if wrap_errors and _from_torch(obj):
            raise ConfigError(_rejected_message(obj, kwargs, where, e, internal_keys)) from e
        raise
    except ValueError as e:
        if wrap_errors:
            raise ConfigError(_rejected_message(obj, kwargs, where, e, internal_keys)) from e
        raise


def _signature(obj: Callable):
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError):
        return None


def _from_torch(obj: Any) -> bool:
    module = getattr(obj, '__module__', None) or ''
    return module == 'torch' or module.startswith('torch.')


def _rejected_message(obj, kwargs, where, err, internal_keys=()) -> str:
    """``where.key = value: <the constructor's complaint>`` for the keys the complaint names."""
    user = {k: v for k, v in kwargs.items() if k not in internal_keys}
    text = str(err) or type(err).__name__
    named = [k for k in user if isinstance(k, str) and re.search(rf'\b{re.escape(k)}\b', text)]
    given = named or list(user)
    if len(named) == 1:
        lines = [f'{where}.{named[0]} = {user[named[0]]!r}: {_qualname(obj)} rejected it: {text}']
    else:
        lines = [f'{where}: {_qualname(obj)} rejected the given values: {text}']
    if given and not (len(named) == 1):
        lines.append('  given: ' + ', '.join(f'{where}.{k} = {user[k]!r}' for k in given))
    return '\n'.join(lines)


def _binding_message(sig, kwargs, where, obj, err, extra_keys=(), internal_keys=()) -> str:
    params = [p for p in sig.parameters.values() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    all_names = [p.name for p in params]
    names = [n for n in all_names if n not in internal_keys]  # what a config may set
    extras = [k for k in extra_keys if k not in all_names]
    has_var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [] if has_var_kw else [k for k in kwargs if k not in all_names]
    missing = [p.name for p in params if p.default is p.empty and p.name not in kwargs
               and p.kind != p.POSITIONAL_ONLY]
    lines = []
    for key in unknown:
        near = did_you_mean(key, names + extras) if isinstance(key, str) else None
        did = (f': did you mean {where}.{near}?' if near
               else ' (no accepted key is close to it)')
        lines.append(f'{where}.{key} = {kwargs[key]!r} is not a parameter of {_qualname(obj)}{did}')
    if not lines:
        lines.append(f'{where}: {_qualname(obj)} does not accept the given arguments ({err}).')
    if missing:
        lines.append(f'missing required key(s): {", ".join(where + "." + m for m in missing)}')
    also = f' (and {", ".join(extras)})' if extras else ''
    lines.append(f'accepted parameters: {", ".join(names) or "none"}{also}')
    return '\n  '.join(lines)


def import_dotted(path: str) -> Any:
    """Import ``'pkg.mod.Name'``; return None if it cannot be resolved.

    A :class:`~scale_runner.config.DataStr` (a string from a data config) resolves only under
    the data-config rules (:func:`resolve_data_type`), which raise :class:`UnsafeTypeError`.
    """
    if isinstance(path, DataStr):
        return resolve_data_type(path)
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


# ---- data configs: what a dotted ``type`` from a .yaml/.json config may name -------------------
# A .py config is code and may name anything. A data config (its strings are DataStr) may name:
# a registered object; a public class or function of a module that registered something with the
# decorator (a plugin module; scale_runner's own and the standard library's excepted); or a
# public ``<namespace>.<Name>`` of the allow-list below whose ``__module__`` lies under that
# namespace (so ``torch.optim.os.system`` and ``torch.utils.data.datapipes.utils.decoder.
# basichandlers``, a pickle.loads, are refused). Nothing outside these is imported.
_REGISTRIES: list[Registry] = []
_REGISTRANT_MODULES: set[str] = set()
_TORCHMETRICS_PARTS = ('aggregation', 'audio', 'classification', 'clustering', 'detection', 'image',
                       'multimodal', 'nominal', 'pairwise', 'regression', 'retrieval',
                       'segmentation', 'shape', 'text', 'video', 'wrappers')
# namespace -> what a data config may name in it: 'callable' (classes and functions),
# 'class' (classes), 'model' (torch.nn.Module and transformers config classes)
_DATA_NAMESPACES: dict[str, str] = {
    'torch.optim': 'callable', 'torch.optim.lr_scheduler': 'callable',
    'torch.optim.swa_utils': 'callable',
    'torch.nn': 'callable', 'torch.nn.functional': 'callable', 'torch.nn.init': 'callable',
    'torch.utils.data': 'callable',
    'torchmetrics': 'callable', 'torchmetrics.functional': 'callable',
    **{f'torchmetrics.{p}': 'callable' for p in _TORCHMETRICS_PARTS},
    **{f'torchmetrics.functional.{p}': 'callable' for p in _TORCHMETRICS_PARTS},
    'transformers': 'model',
    'datasets': 'class',
}
_KIND_TEXT = {'callable': 'classes and functions', 'class': 'classes',
              'model': 'model classes (torch.nn.Module) and config classes'}
_ALLOWED_TEXT = ('torch.optim, torch.optim.lr_scheduler, torch.nn, torch.nn.functional, '
                 'torch.utils.data, torchmetrics, transformers model/config classes, '
                 'datasets classes')


def allow_data_modules(*namespaces: str, classes_only: bool = False) -> None:
    """Let data configs (.yaml/.json) name ``<namespace>.<Name>``: the public classes (and,
    unless ``classes_only``, functions) defined in or under each namespace, e.g.
    ``allow_data_modules('torchvision.transforms')`` in a plugin module. Python code only:
    a data config cannot widen its own rules."""
    for ns in namespaces:
        if not isinstance(ns, str) or not all(p.isidentifier() for p in ns.split('.')):
            raise ValueError(f'allow_data_modules takes dotted module names, got {ns!r}')
        _DATA_NAMESPACES[ns] = 'class' if classes_only else 'callable'


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + '.')


def _plugin_module(module: str) -> bool:
    """A module that registered something (or a submodule of one): the user's plugin code."""
    return (not _under(module, 'scale_runner') and not is_stdlib_module(module)
            and any(_under(module, m) for m in _REGISTRANT_MODULES))


def _may_import(module: str) -> bool:
    """Importing ``module`` runs no code a data config chose: it is already imported, an
    allow-list namespace, or part of a plugin module."""
    return module in sys.modules or module in _DATA_NAMESPACES or _plugin_module(module)


def _registered(obj: Any) -> bool:
    for reg in list(_REGISTRIES):
        reg._load()
        if any(obj is v for v in reg._modules.values()):
            return True
    return False


def _is_class_or_function(obj: Any) -> bool:
    return (inspect.isclass(obj) or inspect.isfunction(obj)
            or (inspect.isbuiltin(obj)
                and isinstance(getattr(obj, '__self__', None), (types.ModuleType, type(None)))))


def _describe(obj: Any) -> str:
    if inspect.ismodule(obj):
        return f'the module {obj.__name__}'
    if inspect.isclass(obj):
        return f'the class {_qualname(obj)}'
    if inspect.isfunction(obj):
        return f'the function {_qualname(obj)}'
    if inspect.isbuiltin(obj):
        return f'the built-in function {_qualname(obj)}'
    return f'a {type(obj).__name__} object'


def _kind_ok(obj: Any, kind: str) -> bool:
    if kind == 'callable':
        return True
    if not inspect.isclass(obj):
        return False
    if kind == 'class':
        return True
    nn_module = getattr(sys.modules.get('torch.nn'), 'Module', None)
    return ((nn_module is not None and issubclass(obj, nn_module))
            or any(c.__name__ in ('PretrainedConfig', 'PreTrainedConfig')
                   and _under(c.__module__, 'transformers') for c in obj.__mro__))


def _data_refusal(obj: Any, module: str, attrs: list[str]) -> str | None:
    """Why a data config may not name ``obj`` (reached as ``module.<attrs>``); None: it may."""
    if _registered(obj):
        return None
    what = _describe(obj)
    if not _is_class_or_function(obj):
        return f'it resolves to {what}, not a class or function'
    obj_module = getattr(obj, '__module__', None)
    if not isinstance(obj_module, str):
        return f'it resolves to {what}, which names no module'
    if len(attrs) == 1 and not attrs[0].startswith('_'):
        kind = _DATA_NAMESPACES.get(module)
        if kind is not None and _under(obj_module, module):
            if _kind_ok(obj, kind):
                return None
            return f'it resolves to {what}, and from {module} a data config may name {_KIND_TEXT[kind]} only'
        if _plugin_module(module) and _plugin_module(obj_module):
            return None
    return f'it resolves to {what}, which is outside the modules a data config may use'


def _refused(path: str, reason: str, registry_name: str | None) -> str:
    reg = (f'@{registry_name.upper()}S.register_module()' if registry_name
           else "its registry's decorator, e.g. @DATASETS.register_module(),")
    return (f'{path!r} is refused: a .yaml/.json config is data, not code, and {reason}. From a '
            f'data config a dotted type may name a registered class or function, a public class '
            f'or function of a module that registered something (your plugin modules, imported '
            f'with custom_imports), or one of {_ALLOWED_TEXT}. To use it: register it '
            f'({reg} in a module listed in custom_imports) and write its name, '
            f"or allow its module from Python with scale_runner.registry.allow_data_modules('pkg.module'), "
            f'or write the config as a .py file (Python code, full power: only for configs you trust).')


def resolve_data_type(path: str, registry_name: str | None = None) -> Any:
    """Resolve a dotted ``type`` from a data config (see the rules above); None if it names
    nothing, :class:`UnsafeTypeError` if the rules refuse it. Only modules that are already
    imported, allow-list namespaces or plugin modules are imported while resolving."""
    parts = str(path).split('.')
    for part in parts:
        if not part.isidentifier() or part.startswith('__'):
            raise UnsafeTypeError(_refused(path, f'{part!r} is not a public name', registry_name))
    import_failed = False
    for i in range(len(parts) - 1, 0, -1):
        module = '.'.join(parts[:i])
        if not _may_import(module):
            continue
        try:
            obj = importlib.import_module(module)
        except ImportError:
            import_failed = True  # e.g. an allow-list package that is not installed
            continue
        attrs = parts[i:]
        try:
            for j, attr in enumerate(attrs[:-1]):
                obj = getattr(obj, attr)
                if not (inspect.ismodule(obj) or inspect.isclass(obj)):
                    reached = '.'.join([module] + attrs[:j + 1])
                    raise UnsafeTypeError(_refused(
                        path, f'{reached} is {_describe(obj)}, not a module or class', registry_name))
            obj = getattr(obj, attrs[-1])
        except AttributeError:
            return None
        reason = _data_refusal(obj, module, attrs)
        if reason is not None:
            raise UnsafeTypeError(_refused(path, reason, registry_name))
        return obj
    if import_failed:
        return None
    raise UnsafeTypeError(_refused(
        path, 'none of its modules is one a data config may import (one already imported, an '
              'allow-list namespace, or a plugin module)', registry_name))


def check_data_types(cfg: Any) -> None:
    """Before anything is built: every dotted ``type`` (and ``runner_type``) string of a data
    config must be allowed by the data-config rules; the error names its key path
    (``train_dataloader.dataset.type``). A config without data strings passes untouched."""
    for where, value in _data_type_strings(cfg, ''):
        if '.' not in value or not all(p.isidentifier() for p in value.split('.')):
            continue  # no import path (the builder reports it, if it ever is resolved)
        if any(value in reg for reg in list(_REGISTRIES)):
            continue
        try:
            resolve_data_type(value)
        except UnsafeTypeError as e:
            raise UnsafeTypeError(f'{where}: {e}') from None


def _data_type_strings(node: Any, path: str):
    if isinstance(node, dict) or (hasattr(node, 'items') and hasattr(node, 'to_dict')):
        for key, value in node.items():
            where = f'{path}.{key}' if path else str(key)
            if key in ('type', 'runner_type') and isinstance(value, DataStr):
                yield where, value
            else:
                yield from _data_type_strings(value, where)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _data_type_strings(value, f'{path}[{i}]')


def _qualname(obj: Any) -> str:
    mod = getattr(obj, '__module__', None)
    name = getattr(obj, '__qualname__', None) or repr(obj)
    return f'{mod}.{name}' if mod else name


def _builtin(obj: Any) -> bool:
    """Whether ``obj`` is one of scale_runner's or torch's own (a name user code may shadow)."""
    module = getattr(obj, '__module__', None) or ''
    return module.split('.')[0] in ('scale_runner', 'torch')


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
        error = UnsafeTypeError if isinstance(e, UnsafeTypeError) else ConfigError
        raise error(f'runner_type: {e.args[0]}') from None
    return cls.from_cfg(cfg)


RUNNERS = Registry('runner', locations=['scale_runner.runner'], build_func=_build_runner)
LOOPS = Registry('loop', locations=['scale_runner.loops'])
HOOKS = Registry('hook', locations=['scale_runner.hooks'])
MODELS = Registry('model', locations=['scale_runner.data_preprocessor'])
DATASETS = Registry('dataset', locations=['scale_runner.hf_datasets'])
DATA_SAMPLERS = Registry('data_sampler', locations=['scale_runner.data'])
FUNCTIONS = Registry('function', locations=['scale_runner.data'])
OPTIMIZERS = Registry('optimizer', populate=_torch_classes('torch.optim', 'Optimizer'))
OPTIM_WRAPPERS = Registry('optim_wrapper', locations=['scale_runner.optim'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry('optim_wrapper_constructor',
                                      locations=['scale_runner.optim_constructor'])
PARAM_SCHEDULERS = Registry('param_scheduler', locations=['scale_runner.schedulers'],
                            populate=_torch_classes('torch.optim.lr_scheduler', 'LRScheduler'))
METRICS = Registry('metric', locations=['scale_runner.evaluation'])
EVALUATORS = Registry('evaluator', locations=['scale_runner.evaluation'])
TRACKERS = Registry('tracker')

__all__ = ['Registry', 'RUNNERS', 'LOOPS', 'HOOKS', 'MODELS', 'DATASETS', 'DATA_SAMPLERS',
           'FUNCTIONS', 'OPTIMIZERS', 'OPTIM_WRAPPERS', 'OPTIM_WRAPPER_CONSTRUCTORS',
           'PARAM_SCHEDULERS', 'METRICS',
           'EVALUATORS', 'TRACKERS', 'import_dotted', 'call_with_cfg', 'allow_data_modules',
           'check_data_types', 'resolve_data_type']
