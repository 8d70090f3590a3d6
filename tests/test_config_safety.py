"""Config files are data unless they are Python (issue 15): a .yaml/.json config may build
registered names, plugin modules' classes and the documented allow-list, never an arbitrary
callable such as ``os.system``; a .py config keeps full power.

Every refused case writes a real config file and goes through ``Config.fromfile`` and
``RUNNERS.build(cfg).train()`` (as ``scale-runner train`` does) or through the CLI itself, with a
marker file that the payload would create and that must stay absent.
"""
from __future__ import annotations

import copy
import importlib
import json
import pickle
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import PARTS_DIR, run_cli
from scale_runner import registry
from scale_runner.config import Config, DataStr
from scale_runner.errors import ConfigError, UnsafeTypeError
from scale_runner.registry import FUNCTIONS, MODELS, RUNNERS

PLUGIN = 'sr_safety_plugin'  # tests/parts/sr_safety_plugin.py
UNREGISTERED = 'sr_safety_unregistered'  # a module that registers nothing


@pytest.fixture(scope='module')
def plugin_dir():
    """The plugin modules' directory, tests/parts (on sys.path through conftest)."""
    return PARTS_DIR


def base_cfg(work_dir) -> dict:
    """A data config that trains: registered names, dotted allow-list types and a dotted type
    of the plugin module (listed in custom_imports)."""
    return {
        'custom_imports': {'imports': [PLUGIN]},
        'model': {'type': 'SafetyNet'},
        'work_dir': str(work_dir),
        'train_dataloader': {'dataset': {'type': f'{PLUGIN}.PlainData', 'n': 16}, 'batch_size': 8,
                             'sampler': {'type': 'DefaultSampler', 'shuffle': True},
                             'collate_fn': {'type': 'torch.utils.data.default_collate'}},
        'train_cfg': {'by_epoch': False, 'max_iters': 2, 'val_interval': 2},
        'optim_wrapper': {'optimizer': {'type': 'torch.optim.AdamW', 'lr': 0.01}},
        'param_scheduler': [{'type': 'torch.optim.lr_scheduler.LinearLR', 'start_factor': 0.5,
                             'by_epoch': False, 'begin': 0, 'end': 2}],
        'val_dataloader': {'dataset': {'type': 'SafetyData', 'n': 8}, 'batch_size': 8},
        'val_cfg': {},
        'val_evaluator': [{'type': 'MSE'}],
        'custom_hooks': [{'type': 'EmptyCacheHook'}],
        'default_hooks': {'checkpoint': None},
        'randomness': {'seed': 0},
        'log_level': 'WARNING',
    }


def write_cfg(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == '.json':
        path.write_text(json.dumps(cfg))
    else:
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def payloads(tmp: Path) -> list[tuple[str, dict]]:
    """Dangerous types, each with arguments that would leave ``tmp/pwned`` (or remove
    ``tmp/victim``) if it were ever called."""
    marker = str(tmp / 'pwned')
    script = tmp / 'script.py'
    script.write_text(f'open({marker!r}, "w").close()\n')
    (tmp / 'victim').mkdir(exist_ok=True)
    touch = f'touch {marker}'
    return [
        ('os.system', {'command': touch}),
        ('posix.system', {'command': touch}),
        ('subprocess.run', {'args': ['touch', marker]}),
        ('subprocess.Popen', {'args': ['touch', marker]}),
        ('subprocess.call', {'args': ['touch', marker]}),
        ('subprocess.check_output', {'args': ['touch', marker]}),
        ('builtins.eval', {'source': f'open({marker!r}, "w")'}),
        ('builtins.exec', {'source': f'open({marker!r}, "w")'}),
        ('builtins.__import__', {'name': 'os'}),
        ('shutil.rmtree', {'path': str(tmp / 'victim')}),
        ('importlib.import_module', {'name': 'json'}),
        ('runpy.run_path', {'path_name': str(script)}),
        ('pathlib.Path', {}),
        ('pickle.loads', {}),
        ('ctypes.CDLL', {'name': None}),
        # re-exports of os through allowed packages: they resolve, to posix.system
        ('torchmetrics.os.system', {'command': touch}),
        ('torch.utils.data.dataloader.os.system', {'command': touch}),
        # a pickle.loads deep inside an allowed package (not a <namespace>.<Name>)
        ('torch.utils.data.datapipes.utils.decoder.basichandlers', {'extension': 'pickle'}),
    ]


def _set(cfg: dict, level: str, t: str, kw: dict) -> None:
    d = {'type': t, **kw}
    if level == 'model':
        cfg['model'] = d
    elif level.startswith('train_dataloader.'):
        cfg['train_dataloader'][level.split('.')[1]] = d
    elif level == 'optim_wrapper.optimizer':
        cfg['optim_wrapper']['optimizer'] = d
    elif level == 'param_scheduler[0]':
        cfg['param_scheduler'][0] = d
    elif level == 'custom_hooks[0]':
        cfg['custom_hooks'][0] = d
    elif level == 'val_evaluator':
        cfg['val_evaluator'] = d
    elif level == 'val_evaluator[1]':
        cfg['val_evaluator'] = [{'type': 'MSE'}, d]
    elif level == 'val_evaluator.metrics[0]':
        cfg['val_evaluator'] = {'type': 'Evaluator', 'metrics': [d]}
    elif level == 'train_cfg':
        cfg['train_cfg'] = {**d, 'max_iters': 2}
    elif level == 'runner_type':
        cfg['runner_type'] = t
    else:  # pragma: no cover
        raise AssertionError(level)


LEVELS = ['model', 'train_dataloader.dataset', 'train_dataloader.sampler',
          'train_dataloader.collate_fn', 'optim_wrapper.optimizer', 'param_scheduler[0]',
          'custom_hooks[0]', 'val_evaluator', 'val_evaluator[1]', 'val_evaluator.metrics[0]',
          'train_cfg', 'runner_type']


def _key_path(level: str) -> str:
    return 'runner_type' if level == 'runner_type' else f'{level}.type'


def _assert_untouched(tmp: Path) -> None:
    assert not (tmp / 'pwned').exists(), 'a payload ran'
    assert (tmp / 'victim').is_dir(), 'a payload ran (rmtree)'


# ---- refused: every dangerous type at every nesting level, YAML and JSON -----------------------
@pytest.mark.parametrize('suffix', ['.yaml', '.json'])
@pytest.mark.parametrize('level', LEVELS)
def test_dangerous_types_are_refused_before_anything_is_built(tmp_path, plugin_dir, level, suffix):
    for i, (t, kw) in enumerate(payloads(tmp_path)):
        cfg = base_cfg(tmp_path / 'work')
        _set(cfg, level, t, kw)
        path = write_cfg(tmp_path / f'c{i}{suffix}', cfg)
        loaded = Config.fromfile(path)
        assert loaded.data_only
        with pytest.raises(UnsafeTypeError) as ei:
            RUNNERS.build(loaded).train()
        msg = str(ei.value)
        assert msg.startswith(f'{_key_path(level)}: {t!r} is refused'), (t, msg)
        assert 'register' in msg and 'custom_imports' in msg and '.py' in msg, msg  # how to allow
        _assert_untouched(tmp_path)
        assert not (tmp_path / 'work').exists(), 'the runner started before the refusal'


# The same refusals where the types are resolved, one by one, while the runner builds (the
# check at Runner.from_cfg switched off): the marks on the strings reach every builder.
@pytest.mark.parametrize('level', LEVELS)
def test_refused_where_each_part_is_built(tmp_path, plugin_dir, monkeypatch, level):
    monkeypatch.setattr(registry, 'check_data_types', lambda cfg: None)
    for i, t in enumerate(['os.system', 'torchmetrics.os.system']):
        kw = {'command': f'touch {tmp_path / "pwned"}'}
        cfg = base_cfg(tmp_path / f'work{i}')
        _set(cfg, level, t, kw)
        loaded = Config.fromfile(write_cfg(tmp_path / f'c{i}.yaml', cfg))
        with pytest.raises(ConfigError) as ei:
            runner = RUNNERS.build(loaded)
            try:
                runner.train()
            finally:
                runner.close()
        msg = str(ei.value)
        assert f'{t!r} is refused' in msg, msg
        name = level.split('[')[0].split('.')[0]
        assert msg.startswith(name), msg  # the key path, e.g. val_evaluator.metrics[1].type
        assert not (tmp_path / 'pwned').exists()


def test_a_function_name_that_is_no_type_key_is_refused_where_it_is_resolved(tmp_path, plugin_dir):
    """``collate_fn: os.system`` (a name, not a dict with a type) is resolved by the builder."""
    cfg = base_cfg(tmp_path / 'work')
    cfg['train_dataloader']['collate_fn'] = 'os.system'
    runner = RUNNERS.build(Config.fromfile(write_cfg(tmp_path / 'c.yaml', cfg)))
    try:
        with pytest.raises(ConfigError) as ei:
            runner.train()
    finally:
        runner.close()
    assert str(ei.value).startswith("train_dataloader.collate_fn: 'os.system' is refused"), ei.value


def test_hf_dataset_map_name_is_refused(tmp_path):
    pytest.importorskip('datasets')
    from scale_runner.registry import DATASETS
    (tmp_path / 'd.jsonl').write_text('{"a": 1}\n')
    cfg = Config.fromfile(write_cfg(tmp_path / 'c.yaml', {'dataset': {
        'type': 'HFDataset', 'path': 'json', 'data_files': str(tmp_path / 'd.jsonl'),
        'map': 'os.system'}}))
    with pytest.raises(ConfigError, match="dataset.map: 'os.system' is refused"):
        DATASETS.build(cfg.dataset)


def test_cli_refuses_a_nested_dangerous_type(tmp_path, plugin_dir):
    marker = tmp_path / 'pwned'
    cfg = base_cfg(tmp_path / 'work')
    cfg['train_dataloader']['dataset'] = {'type': 'os.system', 'command': f'touch {marker}'}
    path = write_cfg(tmp_path / 'evil.yaml', cfg)
    proc = run_cli(['train', str(path)], cwd=tmp_path, env={'PYTHONPATH': str(plugin_dir)})
    assert proc.returncode == 2, proc.stderr
    assert "train_dataloader.dataset.type: 'os.system' is refused" in proc.stderr, proc.stderr
    assert 'Traceback' not in proc.stderr
    assert not marker.exists()
    assert not (tmp_path / 'work').exists()


# ---- allowed: registered names, the allow-list, plugin modules; .py configs --------------------
def test_cli_trains_a_yaml_config_of_registered_allowed_and_plugin_types(tmp_path, plugin_dir):
    path = write_cfg(tmp_path / 'ok.yaml', base_cfg(tmp_path / 'work'))
    proc = run_cli(['train', str(path)], cwd=tmp_path, env={'PYTHONPATH': str(plugin_dir)})
    assert proc.returncode == 0, proc.stderr
    assert 'mse' in proc.stdout
    # The run's config.py says it is data, and is read back as data, without running it.
    dumped = next((tmp_path / 'work').glob('*/config.py'))
    again = Config.fromfile(dumped)
    assert again.data_only and isinstance(again.model.type, DataStr)
    assert again.to_dict() == Config.fromfile(path).to_dict()
    again.merge_from_dict({'model.type': 'os.system'})
    with pytest.raises(UnsafeTypeError, match="model.type: 'os.system' is refused"):
        RUNNERS.build(again)


def test_json_config_trains_in_process(tmp_path, plugin_dir):
    cfg = base_cfg(tmp_path / 'work')
    cfg['val_evaluator'] = {'type': 'Evaluator', 'metrics': [{'type': 'MSE'}]}
    cfg['train_cfg'] = {'type': 'IterBasedTrainLoop', 'max_iters': 2, 'val_interval': 2}
    runner = RUNNERS.build(Config.fromfile(write_cfg(tmp_path / 'ok.json', cfg)))
    try:
        metrics = runner.train()
    finally:
        runner.close()
    assert 'mse' in metrics
    assert isinstance(runner.optim_wrapper.optimizer.optimizer
                      if hasattr(runner.optim_wrapper.optimizer, 'optimizer')
                      else runner.optim_wrapper.optimizer, __import__('torch').optim.AdamW)


def test_allow_list_classes_and_functions_resolve():
    import torch
    expect = {'torch.optim.AdamW': torch.optim.AdamW,
              'torch.optim.lr_scheduler.LinearLR': torch.optim.lr_scheduler.LinearLR,
              'torch.nn.Linear': torch.nn.Linear,
              'torch.nn.functional.relu': torch.nn.functional.relu,
              'torch.utils.data.default_collate': torch.utils.data.default_collate,
              # the path a dump writes for a registered function
              'torch.utils.data._utils.collate.default_collate': torch.utils.data.default_collate}
    for path, obj in expect.items():
        assert MODELS.get(DataStr(path)) is obj, path
    torchmetrics = pytest.importorskip('torchmetrics')
    assert (MODELS.get(DataStr('torchmetrics.classification.MulticlassAccuracy'))
            is torchmetrics.classification.MulticlassAccuracy)


def test_allow_list_kinds():
    transformers = pytest.importorskip('transformers')
    assert MODELS.get(DataStr('transformers.GPT2Config')) is transformers.GPT2Config
    with pytest.raises(UnsafeTypeError, match='model classes'):
        MODELS.get(DataStr('transformers.pipeline'))  # a function: refused
    with pytest.raises(UnsafeTypeError, match='classes only'):
        MODELS.get(DataStr('datasets.load_dataset'))
    with pytest.raises(UnsafeTypeError):
        MODELS.get(DataStr('torch.load'))  # torch itself is not on the list


def test_py_config_keeps_full_power(tmp_path):
    """A .py config is code (README): the same type runs, as any line of it could."""
    marker = tmp_path / 'ran'
    path = tmp_path / 'c.py'
    path.write_text(f"model = dict(type='os.system', command='touch {marker}')\n")
    cfg = Config.fromfile(path)
    assert not cfg.data_only and type(cfg.model.type) is str
    registry.check_data_types(cfg)  # nothing to refuse
    assert MODELS.build(cfg.model) == 0
    assert marker.exists()


def test_python_api_dicts_keep_full_power():
    assert MODELS.build(dict(type='os.path.basename', p='/x/y')) == 'y'
    assert FUNCTIONS.get('os.path.join') is __import__('os').path.join
    with pytest.raises(UnsafeTypeError):
        FUNCTIONS.get(DataStr('os.path.join'))
    with pytest.raises(UnsafeTypeError):
        registry.import_dotted(DataStr('os.path.join'))


# ---- custom_imports in a data config -----------------------------------------------------------
@pytest.mark.parametrize('module', ['subprocess', 'venv.__main__', 'unittest.__main__', 'antigravity',
                                    'os.path', f'{PLUGIN}.__main__'])
def test_data_config_may_not_import_stdlib_or_main_modules(tmp_path, module):
    path = write_cfg(tmp_path / 'c.yaml', {'custom_imports': {'imports': [module]}})
    before = set(sys.modules)
    with pytest.raises(ConfigError, match=f"custom_imports.imports: '{module}' is refused"):
        Config.fromfile(path)
    assert module not in set(sys.modules) - before


def test_listed_module_that_registers_nothing_grants_no_types(tmp_path, plugin_dir):
    """custom_imports imports a module, but a dotted type into it is allowed only if the
    module registered something (a plugin): listing sympy must not unlock sympy.sympify,
    which evaluates its argument."""
    pytest.importorskip('sympy')
    marker = tmp_path / 'pwned'
    for module, t, kw in [
            ('sympy', 'sympy.sympify', {'a': f"__import__('os').system('touch {marker}')"}),
            (UNREGISTERED, f'{UNREGISTERED}.Thing', {})]:
        cfg = base_cfg(tmp_path / 'work')
        cfg['custom_imports']['imports'].append(module)
        cfg['model'] = {'type': t, **kw}
        loaded = Config.fromfile(write_cfg(tmp_path / 'c.yaml', cfg))
        assert module in sys.modules  # imported: the user's visible choice
        with pytest.raises(UnsafeTypeError, match=f"model.type: '{t}' is refused"):
            RUNNERS.build(loaded)
    assert not marker.exists()


def test_allow_data_modules_from_python(plugin_dir, monkeypatch):
    monkeypatch.setattr(registry, '_DATA_NAMESPACES', dict(registry._DATA_NAMESPACES))
    importlib.import_module(UNREGISTERED)
    with pytest.raises(UnsafeTypeError, match='allow_data_modules'):
        MODELS.get(DataStr(f'{UNREGISTERED}.Thing'))
    registry.allow_data_modules(UNREGISTERED)
    assert MODELS.get(DataStr(f'{UNREGISTERED}.Thing')) is sys.modules[UNREGISTERED].Thing
    with pytest.raises(ValueError):
        registry.allow_data_modules('not a module')


def test_pickle_gadget_in_yaml_binary_is_refused(tmp_path):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f'touch {marker}',))

    cfg = {'work_dir': str(tmp_path / 'w'),
           'model': {'type': 'torch.utils.data.datapipes.utils.decoder.basichandlers',
                     'extension': 'pickle', 'data': pickle.dumps(Evil())}}
    path = tmp_path / 'c.yaml'
    path.write_text(yaml.safe_dump(cfg))  # the bytes are a !!binary, which the safe loader reads
    assert '!!binary' in path.read_text()
    with pytest.raises(UnsafeTypeError, match='model.type'):
        RUNNERS.build(Config.fromfile(path))
    assert not marker.exists()


# ---- where the data-only mark comes from, and where it goes ------------------------------------
def _write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_py_base_of_a_yaml_config_is_read_as_data_and_never_runs(tmp_path):
    marker = tmp_path / 'pwned'
    _write(tmp_path / 'base.py', f'''
        import os
        os.system('touch {marker}')
        model = dict(type='SafetyNet')
    ''')
    child = _write(tmp_path / 'exp.yaml', '_base_: base.py\nwork_dir: w\n')
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(child)
    msg = str(ei.value)
    assert f'{tmp_path / "base.py"}:2' in msg and 'read as data' in msg, msg
    assert not marker.exists()


def test_literal_py_base_of_a_yaml_config_is_data(tmp_path):
    marker = tmp_path / 'pwned'
    _write(tmp_path / 'base.py', f'''
        """A base written as Python literals."""
        cmd = 'touch {marker}'
        model = dict(type='os.system', command=cmd)
        lows = [float('-inf'), -1.5, (1, 2)]
        globals()['data-root'] = '/x'
    ''')
    child = _write(tmp_path / 'exp.yaml', f'_base_: base.py\nwork_dir: {tmp_path / "w"}\n')
    cfg = Config.fromfile(child)
    assert cfg.data_only and cfg['data-root'] == '/x' and cfg.lows[0] == float('-inf')
    assert isinstance(cfg.model.type, DataStr)
    with pytest.raises(UnsafeTypeError, match="model.type: 'os.system' is refused"):
        RUNNERS.build(cfg)
    assert not marker.exists()


def test_py_child_of_a_yaml_base_is_code(tmp_path):
    _write(tmp_path / 'base.yaml', 'model: {type: os.path.basename, p: /x/y}\n')
    child = _write(tmp_path / 'exp.py', "_base_ = 'base.yaml'\n")
    cfg = Config.fromfile(child)
    assert not cfg.data_only and type(cfg.model.type) is str
    assert MODELS.build(cfg.model) == 'y'


def test_json_child_of_yaml_base_and_cli_overrides_are_data(tmp_path):
    _write(tmp_path / 'base.yaml', 'model: {type: SafetyNet}\n')
    child = tmp_path / 'exp.json'
    child.write_text(json.dumps({'_base_': 'base.yaml', 'work_dir': str(tmp_path / 'w')}))
    cfg = Config.fromfile(child)
    assert cfg.data_only and isinstance(cfg.model.type, DataStr)
    cfg.merge_from_dict({'model': {'type': 'subprocess.Popen', 'args': ['true']}})
    assert isinstance(cfg.model.type, DataStr)
    with pytest.raises(UnsafeTypeError, match="model.type: 'subprocess.Popen' is refused"):
        RUNNERS.build(cfg)


def test_marked_py_file_is_read_as_data_not_run(tmp_path):
    marker = tmp_path / 'pwned'
    path = _write(tmp_path / 'config.py', f'''
        _data_only_ = True
        model = dict(type='SafetyNet')
        open({str(marker)!r}, 'w')
    ''')
    with pytest.raises(ConfigError, match='read as data'):
        Config.fromfile(path)
    assert not marker.exists()


def test_dump_of_a_data_config_round_trips_as_data(tmp_path):
    src = write_cfg(tmp_path / 'c.yaml', {'model': {'type': 'SafetyNet', 'w': float('inf')},
                                          'data-root': '/x', 'n': None, 't': [1, 'a']})
    cfg = Config.fromfile(src)
    for suffix in ('.py', '.yaml', '.json'):
        cfg.dump(tmp_path / f'd{suffix}')
        again = Config.fromfile(tmp_path / f'd{suffix}')
        assert again.data_only and again == cfg, suffix
    assert '_data_only_ = True' in (tmp_path / 'd.py').read_text()
    # A config of the Python API dumps as plain Python, which stays code.
    Config({'a': 1}).dump(tmp_path / 'plain.py')
    assert not Config.fromfile(tmp_path / 'plain.py').data_only


def test_checkpoint_style_dict_as_data():
    """A config that comes back from elsewhere (a checkpoint's state.json) can be made data."""
    cfg = Config({'model': {'type': 'os.system', 'command': 'true'}, 'work_dir': 'w'},
                 data_only=True)
    with pytest.raises(UnsafeTypeError, match='model.type'):
        RUNNERS.build(cfg)


def test_the_mark_survives_copies_and_to_dict_is_plain(tmp_path):
    cfg = Config.fromfile(write_cfg(tmp_path / 'c.yaml', {'model': {'type': 'a.b', 'xs': ['s']}}))
    for other in (copy.deepcopy(cfg), copy.copy(cfg), pickle.loads(pickle.dumps(cfg)), cfg.copy()):
        assert other.data_only and isinstance(other.model.type, DataStr)
        assert isinstance(other.model.xs[0], DataStr)
    assert isinstance(dict(cfg.model).pop('type'), DataStr)  # as the builders copy it
    plain = cfg.to_dict()
    assert type(plain['model']['type']) is str
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert 'data_only=True' in repr(cfg)
