"""Config files (.py / .yaml / .json) with ``_base_`` inheritance, overrides and dumping."""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import json
import keyword
import math
import os
import pprint
import re
import sys
import types
from pathlib import Path
from typing import Any

from .errors import ConfigError

BASE_KEY = '_base_'
DELETE_KEY = '_delete_'
DATA_ONLY_KEY = '_data_only_'  # ``_data_only_ = True`` in a .py file: read it as data (see dump)
SUFFIXES = ('.py', '.yaml', '.yml', '.json')
DATA_SUFFIXES = ('.yaml', '.yml', '.json')


class DataStr(str):
    """A string read from a data-only config (.yaml/.json, or a .py file read as data).

    The mark travels with the value through every copy the builders make (``dict(cfg)``,
    ``cfg.pop('type')``, ``copy.deepcopy``, pickling), so the registry knows, where it turns a
    dotted ``type`` into an object, that the name came from data and applies the data-config
    rules (``scale_runner.registry``) instead of importing anything. Otherwise a plain ``str``.
    """

    __slots__ = ()

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def mark_data(value):
    """``value`` with every string in it (not the dict keys) a :class:`DataStr`; new containers."""
    if isinstance(value, dict):
        marked = {k: mark_data(v) for k, v in value.items()}
        return ConfigDict(marked) if isinstance(value, ConfigDict) else marked
    if isinstance(value, list):
        return [mark_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(mark_data(v) for v in value)
    if isinstance(value, str) and not isinstance(value, DataStr):
        return DataStr(value)
    return value


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
    if isinstance(value, DataStr):  # to_dict() is plain data, for other libraries (yaml.dump, ...)
        return str(value)
    return value


class Config:
    """A resolved configuration: nested attribute/item access, merging, dumping.

    ``data_only``: the config is data, not code (it was read from a .yaml/.json file, or from a
    .py file marked ``_data_only_ = True``, or made with ``data_only=True`` from a dict that came
    from elsewhere, e.g. a checkpoint's ``state.json``). Its strings are :class:`DataStr`, so a
    dotted ``type`` in it resolves only under the data-config rules (README, "Config files are
    data unless they are Python"). A dict given directly (the Python API) has full power.
    """

    def __init__(self, cfg_dict: dict | None = None, filename: str | None = None,
                 data_only: bool = False):
        if cfg_dict is not None and not isinstance(cfg_dict, dict):
            raise TypeError(f'Config expects a dict, got {type(cfg_dict).__name__}')
        data_only = bool(data_only)
        cfg = ConfigDict(cfg_dict or {})
        object.__setattr__(self, '_cfg', mark_data(cfg) if data_only else cfg)
        object.__setattr__(self, 'filename', str(filename) if filename else None)
        object.__setattr__(self, 'data_only', data_only)

    # ---- loading -------------------------------------------------------------------------
    @staticmethod
    def fromfile(path: str | os.PathLike, import_custom_modules: bool = True) -> 'Config':
        """Load a config file and its ``_base_`` files.

        A .yaml/.json file (or a .py file marked ``_data_only_ = True``, as :meth:`dump` writes
        for a data config) gives a ``data_only`` config: its ``.py`` bases are read as data
        (literal assignments; nothing runs) and its ``custom_imports`` may not name
        standard-library or ``__main__`` modules. A .py file is code and keeps full power,
        whatever its bases are.
        """
        path = Path(path).expanduser()
        resolved = path.resolve()
        data_only = _is_data_file(resolved)
        cfg = _load_with_bases(resolved, chain=(), data_only=data_only)
        cfg.pop(DELETE_KEY, None)
        if import_custom_modules and cfg.get('custom_imports'):
            if data_only:
                check_data_imports(cfg['custom_imports'])
            import_modules(cfg['custom_imports'])
        return Config(cfg, filename=str(path), data_only=data_only)

    # ---- access --------------------------------------------------------------------------
    def __getattr__(self, name):
        # Only reached when normal lookup fails. ``_cfg`` itself (e.g. on an instance being
        # unpickled or copied, before ``__init__`` ran) and dunder probes are not config keys.
        if name == '_cfg' or (name.startswith('__') and name.endswith('__')):
            raise AttributeError(name)
        return getattr(self._cfg, name)

    def __reduce__(self):
        return (Config, (dict(self._cfg), self.filename, self.data_only))

    def __copy__(self):
        return _config(ConfigDict(dict(self._cfg)), self.filename, self.data_only)

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
        return _config(copy.deepcopy(self._cfg, memo), self.filename, self.data_only)

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
        data = ', data_only=True' if self.data_only else ''
        return f'Config(filename={self.filename!r}{data}):\n{self.pretty_text}'

    # ---- overrides -----------------------------------------------------------------------
    def merge_from_dict(self, options: dict[str, Any]) -> None:
        """Merge ``{'a.b.c': value}`` overrides; integer parts index into lists.

        On a ``data_only`` config the values are data too (``--cfg-options model.type=...``
        on a YAML config resolves under the same rules as the file).
        """
        for dotted, value in options.items():
            if self.data_only:
                value = mark_data(value)
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
        data = to_plain(self.to_dict())
        if suffix == '.py':
            text = format_py(data)
            if self.data_only:  # re-read as data, as the file it came from was
                text = (f'# A data config (from {Path(self.filename).name if self.filename else "data"}): '
                        f'scale_runner reads this file as data\n'
                        f'# (literal assignments, nothing runs) and builds it under the '
                        f'data-config rules.\n{DATA_ONLY_KEY} = True\n' + text)
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


def _config(cfg: ConfigDict, filename: str | None, data_only: bool) -> Config:
    """A Config around ``cfg`` as it is (a copy's values are already marked or not)."""
    out = Config.__new__(Config)
    object.__setattr__(out, '_cfg', cfg)
    object.__setattr__(out, 'filename', filename)
    object.__setattr__(out, 'data_only', data_only)
    return out


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
def _load_with_bases(path: Path, chain: tuple, data_only: bool = False) -> ConfigDict:
    """``data_only``: the top file is data, so every base is read as data (no .py file runs)."""
    if path in chain:
        raise ConfigError(f'circular _base_ chain: {" -> ".join(map(str, chain + (path,)))}')
    if not path.is_file():
        near = ''
        if path.parent.is_dir():
            from .errors import closest
            cands = closest(path.name, [p.name for p in path.parent.iterdir()])
            near = f' Files nearby: {", ".join(cands)}.' if cands else ''
        raise ConfigError(f'config file not found: {path}.{near}')
    raw = _load_single(path, data_only=data_only)
    raw.pop(DATA_ONLY_KEY, None)
    bases = raw.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged: ConfigDict = ConfigDict()
    origin: dict[str, Path] = {}
    for b in bases:
        bpath = (path.parent / b).resolve()
        bcfg = _load_with_bases(bpath, chain + (path,), data_only=data_only)
        for key in bcfg:
            if key in origin:
                raise ConfigError(f'duplicate key {key!r} in _base_ files {origin[key]} and {bpath} '
                                  f'(of {path}): define it in one base only, or in {path.name}')
            origin[key] = bpath
        merged.update(bcfg)
    return merge(merged, raw) if bases else _strip_delete(ConfigDict(raw))


def _load_single(path: Path, data_only: bool = False) -> dict:
    suffix = path.suffix.lower()
    if suffix == '.py':
        if data_only:
            return _load_py_data(path, 'a .py base of a data config (.yaml/.json) is read as data')
        if _has_data_marker(path):
            return _load_py_data(path, f'a .py file marked {DATA_ONLY_KEY} = True is read as data')
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


def _is_data_file(path: Path) -> bool:
    """A .yaml/.json file, or a .py file that says it is data (``_data_only_ = True``)."""
    suffix = path.suffix.lower()
    if suffix in DATA_SUFFIXES:
        return True
    return suffix == '.py' and path.is_file() and _has_data_marker(path)


def _has_data_marker(path: Path) -> bool:
    """Whether a .py file assigns ``_data_only_ = True`` at the top level (read, not run)."""
    try:
        tree = ast.parse(path.read_text(encoding='utf-8'), str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return False  # the normal loader reports it
    return any(isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
               and stmt.value.value is True
               and any(isinstance(t, ast.Name) and t.id == DATA_ONLY_KEY for t in stmt.targets)
               for stmt in tree.body)


def _load_py_data(path: Path, why: str) -> dict:
    """A .py config read as data, without running it: module-level ``NAME = value`` (and
    ``globals()['key'] = value``, as :func:`format_py` writes keys that are no Python names),
    where a value is a literal, ``dict(k=v, ...)``, ``float('nan'|'inf'|'-inf')`` or a name
    assigned above in the same file. Anything else (an import, a call, a loop) is an error."""
    source = path.read_text(encoding='utf-8')
    try:
        tree = ast.parse(source, str(path))
    except SyntaxError as e:
        raise ConfigError(f'{path}:{e.lineno}: syntax error in config: {e.msg}') from None
    env: dict[str, Any] = {}
    for stmt in tree.body:
        try:
            if isinstance(stmt, ast.Pass) or (isinstance(stmt, ast.Expr)
                                              and isinstance(stmt.value, ast.Constant)):
                continue  # a docstring
            if not isinstance(stmt, ast.Assign):
                raise ValueError(f'code (an {type(stmt).__name__.lower()} statement)'
                                 if type(stmt).__name__[0] in 'AEIOU'
                                 else f'code (a {type(stmt).__name__.lower()} statement)')
            value = _data_literal(stmt.value, env)
            for i, target in enumerate(stmt.targets):
                env[_data_target(target)] = value if i == 0 else copy.deepcopy(value)
        except ValueError as e:
            line = (ast.get_source_segment(source, stmt) or '').splitlines()[:1]
            code = f' ({line[0].strip()[:80]!r})' if line else ''
            raise ConfigError(
                f'{path}:{stmt.lineno}: {why}: only literal assignments such as '
                f"model = dict(type='MyNet', width=64) are allowed, and nothing runs; this line "
                f'is {e}{code}. Write that file as YAML/JSON, or load it from a .py config '
                f'(Python code, full power: only for files you trust).') from None
    return {k: v for k, v in env.items() if not (k.startswith('_') and k != BASE_KEY)}


_NON_FINITE = {'nan': math.nan, 'inf': math.inf, '+inf': math.inf, '-inf': -math.inf,
               'infinity': math.inf, '+infinity': math.inf, '-infinity': -math.inf}


def _data_target(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id == 'globals'
            and not node.value.args and not node.value.keywords
            and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)):
        return node.slice.value
    raise ValueError(f'an assignment to {type(node).__name__}, not to a name')


def _data_literal(node: ast.AST, env: dict) -> Any:
    """The value of a data expression (see :func:`_load_py_data`); ValueError for code."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        if any(isinstance(e, ast.Starred) for e in node.elts):
            raise ValueError('a * unpacking')
        items = [_data_literal(e, env) for e in node.elts]
        return {ast.List: list, ast.Tuple: tuple, ast.Set: set}[type(node)](items)
    if isinstance(node, ast.Dict):
        if any(k is None for k in node.keys):
            raise ValueError('a ** unpacking')
        return {_data_literal(k, env): _data_literal(v, env) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _data_literal(node.operand, env)
        if isinstance(operand, (int, float, complex)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
        raise ValueError('a sign on something that is no number')
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        if node.func.id == 'dict' and not node.args and all(k.arg for k in node.keywords):
            return {k.arg: _data_literal(k.value, env) for k in node.keywords}
        if (node.func.id == 'float' and len(node.args) == 1 and not node.keywords
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
                and node.args[0].value.strip().lower() in _NON_FINITE):
            return _NON_FINITE[node.args[0].value.strip().lower()]
        raise ValueError(f'code (a call of {node.func.id}())')
    if isinstance(node, ast.Name):
        if node.id in env:
            return copy.deepcopy(env[node.id])
        raise ValueError(f'the name {node.id!r} (only names assigned above in this file can be used)')
    raise ValueError(f'code (a {type(node).__name__} expression)')


def is_stdlib_module(name: str) -> bool:
    """Whether the top-level package of ``name`` is part of Python's standard library."""
    top = name.split('.')[0]
    names = getattr(sys, 'stdlib_module_names', None)  # Python >= 3.10
    if names is not None:
        return top in names
    if top in sys.builtin_module_names:
        return True
    import importlib.util
    import sysconfig
    try:
        spec = importlib.util.find_spec(top)  # finds, does not run, the module
    except (ImportError, ValueError):
        return False
    origin = str(getattr(spec, 'origin', None) or '')
    return origin.startswith(sysconfig.get_paths()['stdlib']) and 'site-packages' not in origin


def check_data_imports(custom_imports: Any) -> None:
    """A data config's ``custom_imports`` may list the user's own plugin modules only.

    Importing a module runs its code: the plugins a YAML config lists are the user's visible
    choice, but a standard-library module (``unittest.__main__``, ``venv.__main__``,
    ``antigravity``, ...) or any ``__main__`` module would turn a data file into a program.
    """
    imports = custom_imports.get('imports', []) if isinstance(custom_imports, dict) else []
    imports = [imports] if isinstance(imports, str) else imports
    for name in imports:
        if not isinstance(name, str):
            continue  # import_modules reports it
        if '__main__' in name.split('.') or is_stdlib_module(name):
            raise ConfigError(
                f'custom_imports.imports: {name!r} is refused in a data config (.yaml/.json): '
                f'importing runs a module\'s code, and a data config may import only your own '
                f'plugin modules (the ones that register components into the registries), not '
                f'standard-library or __main__ modules. Import it from a .py config instead.')


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
    """``['a.b=1', 'c=[1,2]', 'd=None']`` -> ``{'a.b': 1, 'c': [1, 2], 'd': None}``.

    A key must have no empty part (``=5``, ``a..b=1`` are errors); a value that starts with
    ``[``, ``(`` or ``{`` (or ``dict(``) must be a complete literal (``[1,2`` is an error, not
    the string ``'[1,2'``); any other value that is no literal stays a string (``name=foo``).
    """
    out = {}
    for item in items:
        if '=' not in item:
            hint = ''
            if item[:1] in ']),}' or item[-1:] in ']),}':
                hint = (" (a value with spaces is split by the shell: quote the whole option, "
                        "e.g. --cfg-options 'model.dims=[4, 8]')")
            raise ConfigError(f'--cfg-options expects KEY=VALUE, got {item!r}{hint}')
        key, value = item.split('=', 1)
        key = key.strip()
        if not key:
            raise ConfigError(f'--cfg-options {item!r}: the key before "=" is empty; write '
                              f'KEY=VALUE with a dotted key, e.g. train_cfg.max_epochs=3')
        if any(not part.strip() for part in key.split('.')):
            raise ConfigError(f'--cfg-options {item!r}: the key {key!r} has an empty part (a '
                              f'leading, trailing or doubled "."); write e.g. '
                              f'optim_wrapper.optimizer.lr=1e-3')
        try:
            out[key] = parse_value(value.strip())
        except ConfigError as e:
            hint = ''
            if 'never closed' in str(e):
                hint = (" (a value with spaces is split by the shell: quote the whole option, "
                        "e.g. --cfg-options 'model.dims=[4, 8]')")
            raise ConfigError(f'--cfg-options {item!r}: {e}{hint}') from None
    return out


class DictAction(argparse.Action):
    """MMEngine's argparse action for ``--cfg-options KEY=VALUE ...``: a dict of dotted keys
    and parsed values (repeated options merge) for :meth:`Config.merge_from_dict`::

        parser.add_argument('--cfg-options', nargs='+', action=DictAction)

    Values parse as ``scale-runner --cfg-options`` does (literals, true/false/none, bare
    strings); as in MMEngine, top-level commas outside brackets make a list (``a=1,2`` is
    ``[1, 2]``). A bad option is a usage error naming it.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        options = dict(getattr(namespace, self.dest, None) or {})
        items = values if isinstance(values, (list, tuple)) else [values]
        try:
            for item in items:
                key, eq, text = str(item).partition('=')
                parts = _split_top(text.strip()) if eq else []
                if len(parts) > 1 and text.strip()[:1] not in _CLOSING and all(p.strip() for p in parts):
                    options.update(parse_cli_options([f'{key}=[{text}]']))
                else:
                    options.update(parse_cli_options([item]))
        except ConfigError as e:
            parser.error(f'{option_string or self.dest}: {e}')
        setattr(namespace, self.dest, options)


_WORDS = {'true': True, 'false': False, 'none': None, 'null': None}
_CLOSING = {'[': ']', '(': ')', '{': '}'}


def parse_value(text: str) -> Any:
    """Parse a command-line value: Python literals, true/false/none, bare strings in lists.

    A value that starts with a bracket (or ``dict(``) must parse: a :class:`ConfigError` says
    why it does not (an unclosed bracket, a bare name in a dict, ...).
    """
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    try:
        return _literal(ast.parse(text, mode='eval').body)
    except (ValueError, SyntaxError, TypeError, RecursionError):
        pass
    if not (text[:1] in _CLOSING or text.startswith('dict(')):
        return text
    problem = _bracket_problem(text)
    if problem is not None:
        raise ConfigError(f'the value {text!r} starts with {text[0]!r} but is not a complete '
                          f'literal: {problem}')
    if text[0] + text[-1] in ('[]', '()'):
        items = [parse_value(p.strip()) for p in _split_top(text[1:-1]) if p.strip()]
        return items if text[0] == '[' else tuple(items)
    raise ConfigError(f'the value {text!r} is not a valid literal: write a dict as '
                      f"{{'key': value}} or dict(key=value), with strings quoted, e.g. "
                      f"dict(type='AdamW', lr=1e-3)")


def _bracket_problem(text: str) -> str | None:
    """Why the brackets of ``text`` do not balance (quotes respected), or None if they do and
    the first bracket closes at the end."""
    stack: list[tuple[str, int]] = []
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in '\'"':
            quote = ch
        elif ch in _CLOSING:
            stack.append((ch, i))
        elif ch in ')]}':
            if not stack:
                return f'{ch!r} at position {i} closes nothing opened before it'
            if _CLOSING[stack[-1][0]] != ch:
                return (f'{ch!r} at position {i} does not close the {stack[-1][0]!r} at '
                        f'position {stack[-1][1]}')
            stack.pop()
            if not stack and i != len(text) - 1:
                return f'text after the closing {ch!r}: {text[i + 1:]!r}'
    if quote:
        return f'the quote {quote} is never closed'
    if stack:
        ch, i = stack[-1]
        return f'the {ch!r} at position {i} is never closed (add {_CLOSING[ch]!r})'
    return None


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
    """Split at the commas outside brackets and quotes."""
    parts, depth, cur, quote = [], 0, '', None
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in '\'"':
            quote = ch
        elif ch in '[({':
            depth += 1
        elif ch in '])}':
            depth -= 1
        if ch == ',' and depth == 0 and quote is None:
            parts.append(cur)
            cur = ''
        else:
            cur += ch
    parts.append(cur)
    return parts


# ---- dumping -----------------------------------------------------------------------------
def to_plain(value):
    """Classes/functions become dotted paths (resolvable by the registry); others stay."""
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_plain(v) for v in value)
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
    data = to_plain(data)
    printer = _PyPrinter(indent=1, width=100, sort_dicts=False)
    lines = []
    for k, v in data.items():
        text = printer.pformat(v)
        if isinstance(k, str) and k.isidentifier() and not keyword.iskeyword(k):
            lines.append(f'{k} = {text}')
        else:  # a key from a YAML/JSON config that is no Python name
            lines.append(f'globals()[{k!r}] = {text}')
    return '\n'.join(lines) + '\n'
