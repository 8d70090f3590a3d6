"""Config files (.py / .yaml / .json) with ``_base_`` inheritance, overrides and dumping."""
from __future__ import annotations

import ast
import copy
import importlib
import json
import keyword
import math
import os
import pprint
import re
import types
from pathlib import Path
from typing import Any

from .errors import ConfigError

BASE_KEY = '_base_'
DELETE_KEY = '_delete_'
SUFFIXES = ('.py', '.yaml', '.yml', '.json')


class ConfigDict(dict):
    """A dict with attribute access; nested dicts (also inside lists) become ConfigDicts."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __setitem__(self, key, value):
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f'config has no key {name!r}') from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]

    def __deepcopy__(self, memo):
        return ConfigDict({k: copy.deepcopy(v, memo) for k, v in self.items()})

    def to_dict(self) -> dict:
        return _unwrap(self)

    def update(self, *args, **kwargs):
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def copy(self) -> 'ConfigDict':
        return ConfigDict(self)


def _wrap(value):
    if isinstance(value, ConfigDict):
        return value
    if isinstance(value, dict):
        return ConfigDict(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    return value


def _unwrap(value):
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unwrap(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_unwrap(v) for v in value)
    return value


class Config:
    """A resolved configuration: nested attribute/item access, merging, dumping."""

    def __init__(self, cfg_dict: dict | None = None, filename: str | None = None):
        if cfg_dict is not None and not isinstance(cfg_dict, dict):
            raise TypeError(f'Config expects a dict, got {type(cfg_dict).__name__}')
        object.__setattr__(self, '_cfg', ConfigDict(cfg_dict or {}))
        object.__setattr__(self, 'filename', str(filename) if filename else None)

    # ---- loading -------------------------------------------------------------------------
    @staticmethod
    def fromfile(path: str | os.PathLike, import_custom_modules: bool = True) -> 'Config':
        path = Path(path).expanduser()
        cfg = _load_with_bases(path.resolve(), chain=())
        cfg.pop(DELETE_KEY, None)
        if import_custom_modules and cfg.get('custom_imports'):
            import_modules(cfg['custom_imports'])
        return Config(cfg, filename=str(path))

    # ---- access --------------------------------------------------------------------------
    def __getattr__(self, name):
        # Only reached when normal lookup fails. ``_cfg`` itself (e.g. on an instance being
        # unpickled or copied, before ``__init__`` ran) and dunder probes are not config keys.
        if name == '_cfg' or (name.startswith('__') and name.endswith('__')):
            raise AttributeError(name)
        return getattr(self._cfg, name)

    def __reduce__(self):
        return (Config, (dict(self._cfg), self.filename))

    def __copy__(self):
        return Config(dict(self._cfg), self.filename)

    def __setattr__(self, name, value):
        self._cfg[name] = value

    def __getitem__(self, key):
        return self._cfg[key]

    def __setitem__(self, key, value):
        self._cfg[key] = value

    def __delitem__(self, key):
        del self._cfg[key]

    def __contains__(self, key):
        return key in self._cfg

    def __iter__(self):
        return iter(self._cfg)

    def __len__(self):
        return len(self._cfg)

    def __eq__(self, other):
        other = other._cfg if isinstance(other, Config) else other
        return self._cfg == other

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(self._cfg, memo), self.filename)

    def get(self, key, default=None):
        return self._cfg.get(key, default)

    def keys(self):
        return self._cfg.keys()

    def items(self):
        return self._cfg.items()

    def pop(self, key, *default):
        return self._cfg.pop(key, *default)

    def to_dict(self) -> dict:
        return self._cfg.to_dict()

    def copy(self) -> 'Config':
        return copy.deepcopy(self)

    def __repr__(self):
        return f'Config(filename={self.filename!r}):\n{self.pretty_text}'

    # ---- overrides -----------------------------------------------------------------------
    def merge_from_dict(self, options: dict[str, Any]) -> None:
        """Merge ``{'a.b.c': value}`` overrides; integer parts index into lists."""
        for dotted, value in options.items():
            node: Any = self._cfg
            parts = dotted.split('.')
            for depth, part in enumerate(parts[:-1]):
                node = _child(node, part, '.'.join(parts[:depth + 1]), create=True)
            last = parts[-1]
            if isinstance(node, list):
                node[_index(node, last, dotted)] = _wrap(value)
            elif isinstance(value, dict) and isinstance(node.get(last), dict):
                node[last] = merge(node[last], value)
            else:
                node[last] = _strip_delete(copy.deepcopy(value))

    # ---- output --------------------------------------------------------------------------
    @property
    def pretty_text(self) -> str:
        return format_py(self.to_dict())

    def dump(self, path: str | os.PathLike) -> None:
        """Write the config as .py, .yaml/.yml or .json (chosen by the suffix)."""
        path = Path(path)
        suffix = path.suffix.lower()
        data = _to_plain(self.to_dict())
        if suffix == '.py':
            text = format_py(data)
        elif suffix in ('.yaml', '.yml'):
            import yaml
            text = yaml.dump(_lists(data), Dumper=_yaml_class('dumper'), sort_keys=False,
                             default_flow_style=None, allow_unicode=True)
        elif suffix == '.json':
            text = json.dumps(data, indent=2) + '\n'
        else:
            raise ConfigError(f'cannot dump a config to {path}: use one of {", ".join(SUFFIXES)}')
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding='utf-8')


def _child(node, part, path, create):
    if isinstance(node, list):
        return node[_index(node, part, path)]
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f'config has no key {path!r}')
        node[part] = ConfigDict()
    child = node[part]
    if not isinstance(child, (dict, list)):
        raise ConfigError(f'cannot set {path}.*: {path} is {child!r}, not a dict or list')
    return child


def _index(node: list, part: str, path: str) -> int:
    try:
        i = int(part)
        node[i]
        return i
    except (ValueError, IndexError):
        raise ConfigError(f'{path}: {part!r} is not a valid index into a list of {len(node)}') from None


def merge(base: dict, child: dict) -> ConfigDict:
    """Recursively merge ``child`` into a copy of ``base``; ``_delete_=True`` replaces."""
    if child.get(DELETE_KEY):
        return _strip_delete(ConfigDict(copy.deepcopy(dict(child))))
    out = ConfigDict(copy.deepcopy(dict(base)))
    for k, v in child.items():
        if k == DELETE_KEY:
            continue
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            # nothing to merge into: a ``_delete_`` marker inside has no meaning left
            out[k] = _strip_delete(copy.deepcopy(v))
    return out


def _strip_delete(value):
    """Remove every ``_delete_`` marker (in place, recursively) and return ``value``."""
    if isinstance(value, dict):
        value.pop(DELETE_KEY, None)
        for v in value.values():
            _strip_delete(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strip_delete(v)
    return value


# ---- file loading ------------------------------------------------------------------------
def _load_with_bases(path: Path, chain: tuple) -> ConfigDict:
    if path in chain:
        raise ConfigError(f'circular _base_ chain: {" -> ".join(map(str, chain + (path,)))}')
    if not path.is_file():
        near = ''
        if path.parent.is_dir():
            from .errors import closest
            cands = closest(path.name, [p.name for p in path.parent.iterdir()])
            near = f' Files nearby: {", ".join(cands)}.' if cands else ''
        raise ConfigError(f'config file not found: {path}.{near}')
    raw = _load_single(path)
    bases = raw.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: ConfigDict = ConfigDict()
    origin: dict[str, Path] = {}
    for b in bases:
        bpath = (path.parent / b).resolve()
        bcfg = _load_with_bases(bpath, chain + (path,))
        for key in bcfg:
            if key in origin:
                raise ConfigError(f'duplicate key {key!r} in _base_ files {origin[key]} and {bpath} '
                                  f'(of {path}): define it in one base only, or in {path.name}')
            origin[key] = bpath
        merged.update(bcfg)
    return merge(merged, raw) if bases else _strip_delete(ConfigDict(raw))


def _load_single(path: Path) -> dict:
    suffix = path.suffix.lower()
    if suffix == '.py':
        return _load_py(path)
    if suffix in ('.yaml', '.yml'):
        import yaml
        try:
            data = yaml.load(path.read_text(encoding='utf-8'), Loader=_yaml_class('loader'))
        except yaml.YAMLError as e:
            raise ConfigError(f'{path}: not a valid YAML config for the safe loader '
                              f'(Python tags such as !!python/object are refused): {e}') from None
    elif suffix == '.json':
        try:
            data = json.loads(path.read_text(encoding='utf-8'))
        except json.JSONDecodeError as e:
            raise ConfigError(f'{path}: invalid JSON: {e}') from None
    else:
        raise ConfigError(f'{path}: unsupported config type {suffix!r}; use one of {", ".join(SUFFIXES)}')
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path}: a config must be a mapping at the top level, got {type(data).__name__}')
    return data


_FLOAT_WITH_EXPONENT = re.compile(r'^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$')
_YAML_CLASSES: dict = {}


def _yaml_class(kind: str):
    """PyYAML's SafeLoader / SafeDumper (no Python tags), but treating ``1e-3`` as a float as
    YAML 1.2 does (YAML 1.1 wants ``1.0e-3``, so ``lr: 1e-3`` would otherwise load as the
    *string* '1e-3'). The dumper knows the same rule, so it quotes a string '1e-3'."""
    if kind not in _YAML_CLASSES:
        import yaml
        base = yaml.SafeLoader if kind == 'loader' else yaml.SafeDumper
        cls = type(f'ScaleRunner{base.__name__}', (base,), {})
        cls.yaml_implicit_resolvers = {k: list(v) for k, v in base.yaml_implicit_resolvers.items()}
        cls.add_implicit_resolver('tag:yaml.org,2002:float', _FLOAT_WITH_EXPONENT,
                                  list('-+0123456789'))
        _YAML_CLASSES[kind] = cls
    return _YAML_CLASSES[kind]


def _load_py(path: Path) -> dict:
    source = path.read_text(encoding='utf-8')
    namespace: dict[str, Any] = {'__file__': str(path), '__name__': f'scale_runner_config_{path.stem}'}
    try:
        code = compile(source, str(path), 'exec')
    except SyntaxError as e:
        raise ConfigError(f'{path}:{e.lineno}: syntax error in config: {e.msg}') from None
    exec(code, namespace)  # a .py config is Python code by design (see README)
    return {k: v for k, v in namespace.items()
            if not (k.startswith('__') or isinstance(v, types.ModuleType)
                    or (k != BASE_KEY and k.startswith('_'))
                    or (isinstance(v, (types.FunctionType, type)) and getattr(v, '__module__', None)
                        == namespace['__name__']))}


def import_modules(custom_imports: dict) -> None:
    """Import ``custom_imports=dict(imports=[...], allow_failed_imports=False)``."""
    imports = custom_imports.get('imports', [])
    imports = [imports] if isinstance(imports, str) else imports
    for name in imports:
        try:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError:
                importlib.invalidate_caches()  # the module may have been written just now
                importlib.import_module(name)
        except ImportError as e:
            if custom_imports.get('allow_failed_imports'):
                continue
            raise ConfigError(f'custom_imports.imports: cannot import {name!r}: {e}. '
                              f'Is it installed or on PYTHONPATH?') from None
        except Exception as e:
            if custom_imports.get('allow_failed_imports'):
                continue
            raise ConfigError(f'custom_imports.imports: importing {name!r} failed: '
                              f'{type(e).__name__}: {e}') from e


# ---- command-line overrides ---------------------------------------------------------------
def parse_cli_options(items: list[str]) -> dict[str, Any]:
    """``['a.b=1', 'c=[1,2]', 'd=None']`` -> ``{'a.b': 1, 'c': [1, 2], 'd': None}``."""
    out = {}
    for item in items:
        if '=' not in item:
            raise ConfigError(f'--cfg-options expects KEY=VALUE, got {item!r}')
        key, value = item.split('=', 1)
        out[key.strip()] = parse_value(value.strip())
    return out


_WORDS = {'true': True, 'false': False, 'none': None, 'null': None}


def parse_value(text: str) -> Any:
    """Parse a command-line value: Python literals, true/false/none, bare strings in lists."""
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return _literal(ast.parse(text, mode='eval').body)
    except (ValueError, SyntaxError):
        pass
    if len(text) >= 2 and text[0] + text[-1] in ('[]', '()'):
        items = [parse_value(p.strip()) for p in _split_top(text[1:-1]) if p.strip()]
        return items if text[0] == '[' else tuple(items)
    return text


def _literal(node: ast.AST) -> Any:
    """``ast.literal_eval`` plus ``dict(key=literal, ...)`` calls, as configs write them.

    Nothing is executed: any other call or name is refused.
    """
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict':
        if node.args or any(k.arg is None for k in node.keywords):
            raise ValueError('only dict(key=value, ...) is allowed')
        return {k.arg: _literal(k.value) for k in node.keywords}
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Tuple):
        return tuple(_literal(e) for e in node.elts)
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ''
    for ch in text:
        if ch in '[(':
            depth += 1
        elif ch in '])':
            depth -= 1
        if ch == ',' and depth == 0:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return parts


# ---- dumping -----------------------------------------------------------------------------
def _to_plain(value):
    """Classes/functions become dotted paths (resolvable by the registry); others stay."""
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_plain(v) for v in value)
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return f'{value.__module__}.{value.__qualname__}'
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _lists(value):
    """YAML's safe dumper has no tuples: write them as lists."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


class _PyPrinter(pprint.PrettyPrinter):
    """pprint whose output is always valid Python: ``inf``/``nan`` are not names."""

    def format(self, obj, context, maxlevels, level):
        if isinstance(obj, float) and not math.isfinite(obj):
            text = "float('nan')" if math.isnan(obj) else ('1e999' if obj > 0 else '-1e999')
            return text, True, False
        return super().format(obj, context, maxlevels, level)


def format_py(data: dict) -> str:
    data = _to_plain(data)
    printer = _PyPrinter(indent=1, width=100, sort_dicts=False)
    lines = []
    for k, v in data.items():
        text = printer.pformat(v)
        if isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k):
            lines.append(f'{k} = {text}')
        else:  # a key from a YAML/JSON config that is no Python name
            lines.append(f'globals()[{k!r}] = {text}')
    return '\n'.join(lines) + '\n'
