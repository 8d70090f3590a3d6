"""Config: loading (.py/.yaml/.json), access, _base_ inheritance, overrides, dumping, safety."""
from __future__ import annotations

import copy
import json
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

from scale_runner.config import Config, ConfigDict, parse_cli_options, parse_value
from scale_runner.errors import ConfigError


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


SAMPLE = {
    'model': {'type': 'Net', 'dims': [4, 8], 'act': None, 'bias': True},
    'train_cfg': {'by_epoch': True, 'max_epochs': 2},
    'lr': 0.001,
    'tiny': 1e-07,
    'neg': -2.5,
    'name': 'it\'s "quoted"',
    'flags': [True, False, None],
    'nested': [{'a': 1, 'b': [1, 2, {'c': 'x'}]}, [3, 4]],
    'empty': {},
    'empty_list': [],
    'num_str': '1e-3',
    'int_str': '10',
    'multi': 'line1\nline2',
}


# ---- loading ------------------------------------------------------------------------------------
def test_fromfile_py(tmp_path):
    p = write(tmp_path / 'c.py', '''
        import math
        model = dict(type='Net', dims=[4, 8])
        lr = 1e-3 * 2
        _private = 5
        def helper():
            return 1
        steps = [i * 2 for i in range(3)]
    ''')
    cfg = Config.fromfile(p)
    assert cfg.to_dict() == {'model': {'type': 'Net', 'dims': [4, 8]}, 'lr': 0.002,
                             'steps': [0, 2, 4]}
    assert cfg.filename == str(p)


def test_fromfile_py_keeps_imported_classes(tmp_path):
    p = write(tmp_path / 'c.py', '''
        from torch.optim import SGD
        optimizer = dict(type=SGD, lr=0.1)
    ''')
    cfg = Config.fromfile(p)
    assert cfg.optimizer.type is torch.optim.SGD


@pytest.mark.parametrize('suffix', ['.yaml', '.yml'])
def test_fromfile_yaml(tmp_path, suffix):
    p = write(tmp_path / f'c{suffix}', '''
        model:
          type: Net
          dims: [4, 8]
        lr: 1e-3
        small: 1.0e-5
        load_from: null
        flag: true
    ''')
    cfg = Config.fromfile(p)
    assert cfg.to_dict() == {'model': {'type': 'Net', 'dims': [4, 8]}, 'lr': 0.001,
                             'small': 1e-5, 'load_from': None, 'flag': True}
    assert isinstance(cfg.lr, float)


def test_fromfile_json(tmp_path):
    p = tmp_path / 'c.json'
    p.write_text(json.dumps({'model': {'type': 'Net', 'dims': [4, 8]}, 'x': None}))
    cfg = Config.fromfile(p)
    assert cfg.model.dims == [4, 8] and cfg.x is None


def test_fromfile_empty_yaml(tmp_path):
    assert len(Config.fromfile(write(tmp_path / 'e.yaml', ''))) == 0


def test_fromfile_errors(tmp_path):
    with pytest.raises(ConfigError, match='not found'):
        Config.fromfile(tmp_path / 'missing.py')
    with pytest.raises(ConfigError, match='unsupported'):
        Config.fromfile(write(tmp_path / 'c.toml', 'a = 1'))
    with pytest.raises(ConfigError, match='mapping'):
        Config.fromfile(write(tmp_path / 'l.yaml', '- 1\n- 2\n'))
    with pytest.raises(ConfigError, match='JSON'):
        Config.fromfile(write(tmp_path / 'bad.json', '{"a": '))
    with pytest.raises(ConfigError, match='syntax'):
        Config.fromfile(write(tmp_path / 'bad.py', 'a = (\n'))


def test_missing_file_suggests_nearby(tmp_path):
    write(tmp_path / 'default.py', 'a = 1')
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(tmp_path / 'defualt.py')
    assert 'default.py' in str(ei.value)


# ---- access -------------------------------------------------------------------------------------
def test_config_from_dict_and_access():
    cfg = Config({'a': {'b': {'c': 1}}, 'l': [{'x': 1}, [{'y': 2}]], 't': ({'z': 3},)})
    assert cfg.a.b.c == 1 and cfg['a']['b']['c'] == 1 and cfg.a['b'].c == 1
    assert cfg.l[0].x == 1 and cfg['l'][0]['x'] == 1
    assert cfg.l[1][0].y == 2
    assert cfg.t[0].z == 3
    assert isinstance(cfg.a, ConfigDict) and isinstance(cfg.l[0], ConfigDict)
    assert 'a' in cfg and 'q' not in cfg and len(cfg) == 3
    assert set(cfg.keys()) == {'a', 'l', 't'} and list(cfg) == ['a', 'l', 't']
    assert cfg.get('q', 5) == 5 and cfg.get('a').b.c == 1


def test_missing_attribute_is_attribute_error():
    cfg = Config({'a': {'b': 1}})
    with pytest.raises(AttributeError):
        cfg.nope
    with pytest.raises(AttributeError):
        cfg.a.nope
    with pytest.raises(KeyError):
        cfg['nope']
    assert not hasattr(cfg, 'nope') and hasattr(cfg, 'a')


def test_setting_values_wraps_dicts():
    cfg = Config()
    cfg.model = {'type': 'Net', 'layers': [{'k': 3}]}
    cfg['opt'] = {'lr': 1}
    cfg.model.dims = [1]
    assert cfg.model.layers[0].k == 3 and cfg.opt.lr == 1 and cfg['model']['dims'] == [1]
    cfg.a = {}
    cfg.a.setdefault('b', {'c': 1})
    assert cfg.a.b.c == 1
    cfg.a.update({'u': {'v': 2}})
    assert cfg.a.u.v == 2
    assert isinstance(cfg.a.copy(), ConfigDict) and cfg.a.copy().u.v == 2
    del cfg['opt']
    del cfg.model.dims
    assert 'opt' not in cfg and 'dims' not in cfg.model


def test_config_rejects_non_dict():
    with pytest.raises(TypeError):
        Config([1, 2])


def test_to_dict_returns_plain_containers():
    cfg = Config({'a': {'b': [{'c': 1}]}, 't': ({'z': 1},)})
    d = cfg.to_dict()
    assert d == {'a': {'b': [{'c': 1}]}, 't': ({'z': 1},)}

    def check(v):
        if isinstance(v, dict):
            assert type(v) is dict
            for x in v.values():
                check(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                check(x)
    check(d)
    d['a']['b'][0]['c'] = 99  # a copy, not a view
    assert cfg.a.b[0].c == 1


def test_copy_deepcopy_pickle():
    cfg = Config({'a': {'b': [1, 2]}}, filename='x.py')
    for other in (cfg.copy(), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), copy.copy(cfg)):
        assert other == cfg and other.filename == 'x.py'
        assert isinstance(other.a, ConfigDict) and other.a.b == [1, 2]
    deep = copy.deepcopy(cfg)
    deep.a.b.append(3)
    assert cfg.a.b == [1, 2]
    assert pickle.loads(pickle.dumps(cfg.a)).b == [1, 2]


# ---- dump / round trip --------------------------------------------------------------------------
@pytest.mark.parametrize('suffix', ['.py', '.yaml', '.yml', '.json'])
def test_dump_round_trip(tmp_path, suffix):
    cfg = Config(copy.deepcopy(SAMPLE))
    out = tmp_path / 'sub' / f'dumped{suffix}'
    cfg.dump(out)
    again = Config.fromfile(out)
    assert again.to_dict() == SAMPLE
    assert again == cfg
    # types survive, not just equality (True == 1)
    assert again.flags[0] is True and again.model.act is None
    assert isinstance(again.lr, float) and isinstance(again.num_str, str)
    # and the dump of the reloaded config is identical
    out2 = tmp_path / f'again{suffix}'
    again.dump(out2)
    assert out2.read_text() == out.read_text()


@pytest.mark.parametrize('suffix', ['.py', '.yaml', '.json'])
def test_dump_round_trip_of_loaded_base_chain(tmp_path, suffix):
    write(tmp_path / 'base.py', "model = dict(type='Net', dims=[1, 2])\nlr = 0.5\n")
    child = write(tmp_path / 'child.py', "_base_ = './base.py'\nmodel = dict(dims=[3])\n")
    cfg = Config.fromfile(child)
    cfg.dump(tmp_path / f'out{suffix}')
    assert Config.fromfile(tmp_path / f'out{suffix}') == cfg
    assert '_base_' not in (tmp_path / f'out{suffix}').read_text()


@pytest.mark.parametrize('suffix', ['.py', '.yaml', '.json'])
def test_dump_round_trip_infinity(tmp_path, suffix):
    cfg = Config({'max_norm': float('inf'), 'lows': [float('-inf'), 1.5]})
    cfg.dump(tmp_path / f'inf{suffix}')
    assert Config.fromfile(tmp_path / f'inf{suffix}') == cfg


def test_dump_classes_as_dotted_paths(tmp_path):
    from scale_runner.registry import OPTIMIZERS
    cfg = Config({'optimizer': {'type': torch.optim.SGD, 'lr': 0.1}})
    for suffix in ('.py', '.yaml', '.json'):
        cfg.dump(tmp_path / f'o{suffix}')
        again = Config.fromfile(tmp_path / f'o{suffix}')
        assert isinstance(again.optimizer.type, str)
        assert OPTIMIZERS.get(again.optimizer.type) is torch.optim.SGD


def test_dump_unknown_suffix_is_an_error(tmp_path):
    with pytest.raises(ConfigError):
        Config({'a': 1}).dump(tmp_path / 'x.txt')


def test_pretty_text_is_python_that_reloads_equal(tmp_path):
    cfg = Config(copy.deepcopy(SAMPLE))
    text = cfg.pretty_text
    ns: dict = {}
    exec(compile(text, '<pretty>', 'exec'), ns)
    assert {k: v for k, v in ns.items() if k != '__builtins__'} == SAMPLE
    p = tmp_path / 'pretty.py'
    p.write_text(text)
    assert Config.fromfile(p) == cfg
    assert 'model' in repr(cfg)


def test_pretty_text_long_values_stay_valid_python(tmp_path):
    cfg = Config({'long': 'word ' * 60, 'many': list(range(100)),
                  'deep': {'a': {'b': {'c': [{'d': 'x' * 120}]}}}})
    p = tmp_path / 'long.py'
    p.write_text(cfg.pretty_text)
    assert Config.fromfile(p) == cfg


def test_pretty_text_with_keys_that_are_not_python_names(tmp_path):
    """A YAML/JSON config may have keys such as 'data-root' or 'class'."""
    src = write(tmp_path / 'k.yaml', "data-root: /x\nclass: 3\nok: 1\n")
    cfg = Config.fromfile(src)
    cfg.dump(tmp_path / 'k.py')
    assert Config.fromfile(tmp_path / 'k.py') == cfg


# ---- _base_ -------------------------------------------------------------------------------------
def test_base_as_string_relative_to_file(tmp_path):
    write(tmp_path / 'configs' / '_base_' / 'model.py', '''
        model = dict(type='Net', dims=[4, 8], act=dict(type='ReLU', inplace=True))
        lr = 0.1
    ''')
    child = write(tmp_path / 'configs' / 'exp.py', '''
        _base_ = './_base_/model.py'
        model = dict(dims=[16], act=dict(inplace=False))
        epochs = 3
    ''')
    cfg = Config.fromfile(child)
    assert cfg.to_dict() == {'model': {'type': 'Net', 'dims': [16],
                                       'act': {'type': 'ReLU', 'inplace': False}},
                             'lr': 0.1, 'epochs': 3}
    assert '_base_' not in cfg


def test_base_path_independent_of_cwd(tmp_path, monkeypatch):
    write(tmp_path / 'a' / 'base.py', 'x = 1')
    child = write(tmp_path / 'a' / 'child.py', "_base_ = 'base.py'\ny = 2")
    monkeypatch.chdir(tmp_path)
    assert Config.fromfile('a/child.py').to_dict() == {'x': 1, 'y': 2}


def test_base_as_list(tmp_path):
    write(tmp_path / 'model.py', "model = dict(type='Net', dims=[4])")
    write(tmp_path / 'sched.yaml', 'train_cfg:\n  max_epochs: 10\n  by_epoch: true\n')
    write(tmp_path / 'data.json', '{"train_dataloader": {"batch_size": 8}}')
    child = write(tmp_path / 'exp.py', '''
        _base_ = ['./model.py', './sched.yaml', './data.json']
        train_cfg = dict(max_epochs=2)
    ''')
    cfg = Config.fromfile(child)
    assert cfg.to_dict() == {'model': {'type': 'Net', 'dims': [4]},
                             'train_cfg': {'max_epochs': 2, 'by_epoch': True},
                             'train_dataloader': {'batch_size': 8}}


def test_multi_level_chain(tmp_path):
    write(tmp_path / 'base' / 'base.py', '''
        model = dict(type='Net', dims=[4], depth=1)
        lr = 0.1
        tag = 'base'
    ''')
    write(tmp_path / 'mid' / 'child.py', '''
        _base_ = '../base/base.py'
        model = dict(depth=2)
        tag = 'child'
    ''')
    grand = write(tmp_path / 'grandchild.py', '''
        _base_ = 'mid/child.py'
        model = dict(dims=[8])
        extra = True
    ''')
    cfg = Config.fromfile(grand)
    assert cfg.to_dict() == {'model': {'type': 'Net', 'dims': [8], 'depth': 2},
                             'lr': 0.1, 'tag': 'child', 'extra': True}


def test_yaml_child_with_py_base(tmp_path):
    write(tmp_path / 'base.py', "model = dict(type='Net', dims=[4, 8])\nlr = 0.1\n")
    child = write(tmp_path / 'exp.yaml', '''
        _base_: ./base.py
        model:
          dims: [2]
        lr: 0.5
    ''')
    cfg = Config.fromfile(child)
    assert cfg.to_dict() == {'model': {'type': 'Net', 'dims': [2]}, 'lr': 0.5}


def test_json_child_with_yaml_base_list(tmp_path):
    write(tmp_path / 'b.yml', 'a:\n  x: 1\n  y: 2\n')
    child = tmp_path / 'c.json'
    child.write_text(json.dumps({'_base_': ['b.yml'], 'a': {'y': 3}}))
    assert Config.fromfile(child).to_dict() == {'a': {'x': 1, 'y': 3}}


def test_delete_replaces_dict(tmp_path):
    write(tmp_path / 'base.py', '''
        optimizer = dict(type='SGD', lr=0.1, momentum=0.9, nesterov=True)
        model = dict(type='Net', head=dict(type='Linear', bias=True, dims=4))
    ''')
    child = write(tmp_path / 'exp.py', '''
        _base_ = './base.py'
        optimizer = dict(_delete_=True, type='AdamW', lr=1e-3)
        model = dict(head=dict(_delete_=True, type='Conv'))
    ''')
    cfg = Config.fromfile(child)
    assert cfg.to_dict() == {'optimizer': {'type': 'AdamW', 'lr': 1e-3},
                             'model': {'type': 'Net', 'head': {'type': 'Conv'}}}


def test_delete_marker_never_leaks_into_the_result(tmp_path):
    """``_delete_`` with nothing to replace (no such key in the base, or no base at all) must
    not end up as a ``_delete_`` argument of a constructor."""
    write(tmp_path / 'base.py', "a = dict(x=1)\nb = None\n")
    child = write(tmp_path / 'exp.yaml', '''
        _base_: base.py
        new_key:
          _delete_: true
          type: X
        b:
          _delete_: true
          y: 2
        lst:
          - _delete_: true
            z: 3
    ''')
    cfg = Config.fromfile(child)
    assert cfg.to_dict() == {'a': {'x': 1}, 'new_key': {'type': 'X'}, 'b': {'y': 2},
                             'lst': [{'z': 3}]}
    lone = write(tmp_path / 'lone.py', "opt = dict(_delete_=True, type='SGD')\n")
    assert Config.fromfile(lone).to_dict() == {'opt': {'type': 'SGD'}}


def test_duplicate_keys_across_bases_name_both_files(tmp_path):
    write(tmp_path / 'one.py', 'lr = 0.1\nmodel = dict(a=1)')
    write(tmp_path / 'two.yaml', 'lr: 0.2\n')
    child = write(tmp_path / 'exp.py', "_base_ = ['one.py', 'two.yaml']\n")
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(child)
    msg = str(ei.value)
    assert "'lr'" in msg and 'one.py' in msg and 'two.yaml' in msg


def test_same_key_in_base_and_child_is_fine(tmp_path):
    write(tmp_path / 'one.py', 'lr = 0.1')
    child = write(tmp_path / 'exp.py', "_base_ = 'one.py'\nlr = 0.2\n")
    assert Config.fromfile(child).lr == 0.2


def test_circular_base_is_an_error(tmp_path):
    write(tmp_path / 'a.py', "_base_ = 'b.py'\nx = 1")
    write(tmp_path / 'b.yaml', '_base_: c.py\ny: 2\n')
    write(tmp_path / 'c.py', "_base_ = 'a.py'\nz = 3")
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(tmp_path / 'a.py')
    assert 'circular' in str(ei.value) and 'b.yaml' in str(ei.value)
    write(tmp_path / 'self.py', "_base_ = 'self.py'\n")
    with pytest.raises(ConfigError, match='circular'):
        Config.fromfile(tmp_path / 'self.py')


def test_missing_base_names_the_path(tmp_path):
    child = write(tmp_path / 'exp.py', "_base_ = './bases/nothere.py'\n")
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(child)
    assert str(tmp_path / 'bases' / 'nothere.py') in str(ei.value)


# ---- custom_imports -----------------------------------------------------------------------------
def test_custom_imports_registers_a_class(tmp_path, monkeypatch):
    from scale_runner.registry import MODELS
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / 'my_cfg_plugin_ok.py', '''
        from scale_runner.registry import MODELS

        @MODELS.register_module()
        class PluginNetForCfgTest:
            def __init__(self, width=1):
                self.width = width
    ''')
    monkeypatch.delitem(sys.modules, 'my_cfg_plugin_ok', raising=False)
    assert 'PluginNetForCfgTest' not in MODELS
    cfg_file = write(tmp_path / 'exp.py', '''
        custom_imports = dict(imports=['my_cfg_plugin_ok'], allow_failed_imports=False)
        model = dict(type='PluginNetForCfgTest', width=3)
    ''')
    try:
        cfg = Config.fromfile(cfg_file)
        assert 'PluginNetForCfgTest' in MODELS
        assert MODELS.build(cfg.model).width == 3
    finally:
        MODELS._modules.pop('PluginNetForCfgTest', None)


def test_custom_imports_as_string_in_yaml(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / 'my_cfg_plugin_flag.py', 'import builtins\nbuiltins._scale_runner_flag = 42\n')
    monkeypatch.delitem(sys.modules, 'my_cfg_plugin_flag', raising=False)
    cfg_file = write(tmp_path / 'exp.yaml', 'custom_imports:\n  imports: my_cfg_plugin_flag\n')
    import builtins
    try:
        Config.fromfile(cfg_file)
        assert builtins._scale_runner_flag == 42
    finally:
        del builtins._scale_runner_flag


def test_custom_imports_not_run_when_disabled(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg_file = write(tmp_path / 'exp.py', "custom_imports = dict(imports=['no_such_module_q'])\n")
    cfg = Config.fromfile(cfg_file, import_custom_modules=False)
    assert cfg.custom_imports.imports == ['no_such_module_q']


def test_custom_imports_failure_names_the_module(tmp_path):
    cfg_file = write(tmp_path / 'exp.py',
                     "custom_imports = dict(imports=['definitely_missing_mod_xyz'])\n")
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(cfg_file)
    assert 'definitely_missing_mod_xyz' in str(ei.value) and 'custom_imports' in str(ei.value)


def test_custom_imports_module_that_raises_names_the_module(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    write(tmp_path / 'my_cfg_plugin_broken.py', "raise RuntimeError('plugin exploded')\n")
    cfg_file = write(tmp_path / 'exp.py', "custom_imports = dict(imports=['my_cfg_plugin_broken'])\n")
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(cfg_file)
    assert 'my_cfg_plugin_broken' in str(ei.value) and 'plugin exploded' in str(ei.value)


def test_custom_imports_allow_failed(tmp_path):
    cfg_file = write(tmp_path / 'exp.py', "custom_imports = dict(imports=['missing_mod_zz'], "
                                          "allow_failed_imports=True)\nx = 1\n")
    assert Config.fromfile(cfg_file).x == 1


# ---- overrides ----------------------------------------------------------------------------------
def test_merge_from_dict():
    cfg = Config({'train_cfg': {'max_epochs': 10, 'by_epoch': True}, 'model': {'dims': [1]}})
    cfg.merge_from_dict({'train_cfg.max_epochs': 3, 'model.dims': [4, 8]})
    assert cfg.to_dict() == {'train_cfg': {'max_epochs': 3, 'by_epoch': True},
                             'model': {'dims': [4, 8]}}


def test_merge_from_dict_creates_nested_keys():
    cfg = Config({'load_from': None})
    cfg.merge_from_dict({'a.b.c': 1, 'a.b.d': {'e': 2}, 'load_from.x': 5})
    assert cfg.a.b.c == 1 and cfg.a.b.d.e == 2 and isinstance(cfg.a.b, ConfigDict)
    assert cfg.load_from.x == 5


def test_merge_from_dict_list_index():
    cfg = Config({'a': [{'b': 1, 'k': 0}, {'b': 2}], 'l': [1, 2, 3]})
    cfg.merge_from_dict({'a.0.b': 10, 'a.1.c': {'x': 1}, 'l.2': 30, 'a.-1.b': 20})
    assert cfg.to_dict() == {'a': [{'b': 10, 'k': 0}, {'b': 20, 'c': {'x': 1}}], 'l': [1, 2, 30]}
    assert cfg.a[1].c.x == 1
    with pytest.raises(ConfigError):
        cfg.merge_from_dict({'a.5.b': 1})
    with pytest.raises(ConfigError):
        cfg.merge_from_dict({'a.x.b': 1})


def test_merge_from_dict_into_scalar_is_an_error():
    cfg = Config({'lr': 0.1})
    with pytest.raises(ConfigError, match='lr'):
        cfg.merge_from_dict({'lr.x': 1})


def test_merge_from_dict_merges_and_deletes_dicts():
    cfg = Config({'opt': {'type': 'SGD', 'lr': 0.1, 'momentum': 0.9}})
    cfg.merge_from_dict({'opt': {'lr': 0.5}})
    assert cfg.opt.to_dict() == {'type': 'SGD', 'lr': 0.5, 'momentum': 0.9}
    cfg.merge_from_dict({'opt': {'_delete_': True, 'type': 'AdamW'}})
    assert cfg.opt.to_dict() == {'type': 'AdamW'}
    cfg.merge_from_dict({'fresh': {'_delete_': True, 'type': 'X'}})
    assert cfg.fresh.to_dict() == {'type': 'X'}


def test_merge_from_dict_does_not_alias_the_value():
    cfg = Config({})
    value = {'dims': [1, 2]}
    cfg.merge_from_dict({'model': value})
    cfg.model.dims.append(3)
    assert value == {'dims': [1, 2]}


def test_parse_cli_options_types():
    opts = parse_cli_options(['train_cfg.max_epochs=3', 'model.dims=[4,8]', 'load_from=None',
                              'flag=true', 'name=abc', 'pair=(1,2)', 'names=[a,b]'])
    assert opts == {'train_cfg.max_epochs': 3, 'model.dims': [4, 8], 'load_from': None,
                    'flag': True, 'name': 'abc', 'pair': (1, 2), 'names': ['a', 'b']}
    assert type(opts['train_cfg.max_epochs']) is int
    assert opts['flag'] is True and type(opts['pair']) is tuple and type(opts['names']) is list


def test_parse_value_more_cases():
    assert parse_value('False') is False and parse_value('false') is False
    assert parse_value('null') is None and parse_value('none') is None
    assert parse_value('1e-3') == 0.001 and isinstance(parse_value('0.5'), float)
    assert parse_value('-2') == -2
    assert parse_value("'quoted str'") == 'quoted str'
    assert parse_value('[a,[b,c],1]') == ['a', ['b', 'c'], 1]
    assert parse_value('[1, x, true]') == [1, 'x', True]
    assert parse_value('a/b/c.pt') == 'a/b/c.pt'
    assert parse_value('[]') == []
    assert parse_value("{'a': 1}") == {'a': 1}


def test_parse_cli_options_value_with_equals_and_errors():
    assert parse_cli_options(['name=a=b']) == {'name': 'a=b'}
    with pytest.raises(ConfigError, match='KEY=VALUE'):
        parse_cli_options(['no_equals_sign'])


def test_cli_options_applied_to_a_loaded_config(tmp_path):
    p = write(tmp_path / 'c.yaml', 'train_cfg:\n  max_epochs: 10\nmodel:\n  dims: [1]\n')
    cfg = Config.fromfile(p)
    cfg.merge_from_dict(parse_cli_options(['train_cfg.max_epochs=3', 'model.dims=[4,8]']))
    assert cfg.train_cfg.max_epochs == 3 and cfg.model.dims == [4, 8]


# ---- YAML safety --------------------------------------------------------------------------------
@pytest.mark.parametrize('payload', [
    '!!python/object/apply:os.system ["echo pwned > {f}"]',
    '!!python/object/new:os.system ["echo pwned > {f}"]',
    '!!python/name:os.system',
])
def test_yaml_python_tags_are_refused(tmp_path, payload):
    marker = tmp_path / 'pwned.txt'
    p = write(tmp_path / 'evil.yaml', 'a: 1\nb: ' + payload.format(f=marker) + '\n')
    with pytest.raises(ConfigError) as ei:
        Config.fromfile(p)
    assert 'evil.yaml' in str(ei.value)
    assert not marker.exists()


def test_yaml_python_tag_in_a_base_is_refused(tmp_path):
    marker = tmp_path / 'pwned2.txt'
    write(tmp_path / 'evil.yml', f'x: !!python/object/apply:os.system ["echo pwned > {marker}"]\n')
    child = write(tmp_path / 'exp.py', "_base_ = 'evil.yml'\n")
    with pytest.raises(ConfigError):
        Config.fromfile(child)
    assert not marker.exists()


# ---- typo'd top-level keys (Runner.from_cfg) ----------------------------------------------------
def _runner_cfg(tmp_path, **extra):
    return dict(model=torch.nn.Linear(2, 2), work_dir=str(tmp_path), **extra)


@pytest.mark.parametrize('typo,intended', [
    ('optim_wraper', 'optim_wrapper'), ('resum', 'resume'), ('train_dataloder', 'train_dataloader'),
    ('work_dirs', 'work_dir'), ('default_hook', 'default_hooks'),
])
def test_typod_top_level_key_is_an_error(tmp_path, typo, intended):
    from scale_runner.runner import Runner
    cfg = _runner_cfg(tmp_path, **{typo: dict(optimizer=dict(type='SGD', lr=0.1))})
    with pytest.raises(ConfigError) as ei:
        Runner.from_cfg(cfg)
    assert repr(intended) in str(ei.value) and typo in str(ei.value)


def test_typod_key_in_config_file(tmp_path):
    from scale_runner.runner import Runner
    p = write(tmp_path / 'c.py', f'''
        import torch
        work_dir = {str(tmp_path)!r}
        model = dict(type='torch.nn.Linear', in_features=2, out_features=2)
        optim_wraper = dict(optimizer=dict(type='SGD', lr=0.1))
    ''')
    with pytest.raises(ConfigError, match="'optim_wrapper'"):
        Runner.from_cfg(Config.fromfile(p))


def test_unrelated_helper_keys_are_allowed(tmp_path):
    from scale_runner.runner import Runner
    runner = Runner.from_cfg(_runner_cfg(tmp_path, dataset_root='x', num_classes=3,
                                         custom_imports=dict(imports=[]),
                                         optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1))))
    assert runner.cfg.num_classes == 3 and runner.cfg.dataset_root == 'x'
    assert isinstance(runner.model, torch.nn.Linear)


# ---- import cost --------------------------------------------------------------------------------
def test_importing_config_does_not_import_torch():
    code = ("import sys; import scale_runner.config, scale_runner.errors; "
            "print('torch' in sys.modules, 'yaml' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ['False', 'False']


def test_cli_values_accept_dict_calls_but_run_nothing(tmp_path):
    from scale_runner.config import parse_cli_options
    marker = tmp_path / 'ran'
    opts = parse_cli_options([
        "trackers=[dict(type='wandb', project='p', init_kwargs=dict(tags=['a'])), dict(type='tensorboard')]",
        f"evil=__import__('pathlib').Path({str(marker)!r}).touch()",
    ])
    assert opts['trackers'] == [{'type': 'wandb', 'project': 'p', 'init_kwargs': {'tags': ['a']}},
                                {'type': 'tensorboard'}]
    assert isinstance(opts['evil'], str) and not marker.exists()
