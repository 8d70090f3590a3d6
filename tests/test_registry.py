"""Registry: registration forms, lookup by name/class/dotted path, build, errors, root registries."""
from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import PARTS_DIR

from scale_runner.errors import ConfigError
from scale_runner.registry import Registry


def fresh(name='toy'):
    return Registry(name)


class Point:
    def __init__(self, x, y=0, *, scale=1.0):
        self.x, self.y, self.scale = x, y, scale


# ---- registration ------------------------------------------------------------------------------
def test_register_as_decorator_uses_class_name():
    reg = fresh()

    @reg.register_module()
    class Foo:
        pass

    assert 'Foo' in reg
    assert reg.get('Foo') is Foo
    assert len(reg) == 1
    assert reg.keys() == ['Foo']


def test_register_decorator_returns_the_class_unchanged():
    reg = fresh()

    class Foo:
        pass

    assert reg.register_module()(Foo) is Foo
    assert reg.register_module(module=Point) is Point


def test_register_as_call_with_module():
    reg = fresh()
    reg.register_module(module=Point)
    assert reg.get('Point') is Point
    reg.register_module(name='add_one', module=lambda v: v + 1)
    assert reg.get('add_one')(1) == 2


def test_register_with_str_name():
    reg = fresh()

    @reg.register_module(name='Renamed')
    class Foo:
        pass

    assert 'Renamed' in reg and 'Foo' not in reg
    assert reg.get('Renamed') is Foo


def test_register_with_list_of_names():
    reg = fresh()
    reg.register_module(name=['P', 'Pt', 'point'], module=Point)
    assert reg.keys() == ['P', 'Pt', 'point']
    assert len(reg) == 3
    assert all(reg.get(n) is Point for n in ('P', 'Pt', 'point'))


def test_register_functions():
    reg = fresh()

    @reg.register_module()
    def make_pair(a, b=2):
        return (a, b)

    assert reg.build(dict(type='make_pair', a=1)) == (1, 2)


def test_duplicate_name_without_force_is_an_error():
    reg = fresh('widget')

    @reg.register_module()
    class Foo:
        pass

    class Other:
        pass

    with pytest.raises(KeyError) as ei:
        reg.register_module(name='Foo', module=Other)
    msg = str(ei.value)
    assert 'Foo' in msg and 'widget' in msg and 'force=True' in msg
    assert reg.get('Foo') is Foo  # unchanged


def test_duplicate_name_in_decorator_form_is_an_error():
    reg = fresh()

    @reg.register_module()
    class Foo:
        pass

    with pytest.raises(KeyError):
        @reg.register_module()
        class Foo:  # noqa: F811
            pass


def test_duplicate_name_with_force_replaces():
    reg = fresh()

    @reg.register_module()
    class Foo:
        pass

    @reg.register_module(name='Foo', force=True)
    class Foo2:
        pass

    assert reg.get('Foo') is Foo2
    assert len(reg) == 1


def test_reregistering_the_same_object_is_fine():
    reg = fresh()
    reg.register_module(module=Point)
    reg.register_module(module=Point)
    assert len(reg) == 1


def test_force_must_be_bool():
    with pytest.raises(TypeError):
        fresh().register_module(force='yes')


def test_register_module_without_parentheses_is_a_clear_error():
    reg = fresh()
    with pytest.raises(TypeError, match='register_module'):
        @reg.register_module
        class Foo:
            pass


# ---- lookup ------------------------------------------------------------------------------------
def test_get_by_class_returns_it():
    reg = fresh()
    assert reg.get(Point) is Point
    assert reg.get(torch.optim.SGD) is torch.optim.SGD


def test_get_by_dotted_path():
    reg = fresh()
    assert reg.get('torch.optim.AdamW') is torch.optim.AdamW
    assert reg.get('collections.OrderedDict') is __import__('collections').OrderedDict
    # nested attribute after the module
    assert reg.get('torch.optim.lr_scheduler.StepLR') is torch.optim.lr_scheduler.StepLR


def test_get_registered_name_wins_over_dotted_path():
    reg = fresh()
    reg.register_module(name='torch.optim.AdamW', module=Point)
    assert reg.get('torch.optim.AdamW') is Point


def test_get_unknown_dotted_path_is_a_key_error():
    reg = fresh()
    with pytest.raises(KeyError):
        reg.get('torch.optim.NoSuchOptimizer')
    with pytest.raises(KeyError):
        reg.get('no_such_pkg_xyz.Thing')


def test_contains_len_keys():
    reg = fresh()
    assert len(reg) == 0 and reg.keys() == [] and 'Point' not in reg
    reg.register_module(module=Point)
    reg.register_module(name='b', module=dict)
    assert 'Point' in reg and 'b' in reg and 'c' not in reg
    assert len(reg) == 2
    assert reg.keys() == ['Point', 'b']
    assert 'toy' in repr(reg)


# ---- build -------------------------------------------------------------------------------------
def test_build_by_name():
    reg = fresh()
    reg.register_module(module=Point)
    p = reg.build(dict(type='Point', x=1, y=2))
    assert isinstance(p, Point) and (p.x, p.y, p.scale) == (1, 2, 1.0)


def test_build_by_class_and_dotted_path():
    reg = fresh()
    p = reg.build(dict(type=Point, x=5))
    assert isinstance(p, Point) and p.x == 5
    od = reg.build(dict(type='collections.OrderedDict', a=1))
    assert type(od).__name__ == 'OrderedDict' and od == {'a': 1}


def test_build_default_args_do_not_override_cfg():
    reg = fresh()
    reg.register_module(module=Point)
    p = reg.build(dict(type='Point', x=1, y=2), y=100, scale=3.0)
    assert (p.x, p.y, p.scale) == (1, 2, 3.0)
    p = reg.build(dict(type='Point'), x=7)
    assert p.x == 7


def test_build_does_not_mutate_cfg():
    reg = fresh()
    reg.register_module(module=Point)
    cfg = dict(type='Point', x=1)
    reg.build(cfg, y=3)
    assert cfg == dict(type='Point', x=1)


def test_build_accepts_config_dict():
    from scale_runner.config import Config
    reg = fresh()
    reg.register_module(module=Point)
    cfg = Config(dict(p=dict(type='Point', x=4)))
    p = reg.build(cfg.p)
    assert isinstance(p, Point) and p.x == 4


def test_build_returns_built_objects_unchanged():
    reg = fresh()
    obj = Point(1)
    assert reg.build(obj) is obj
    assert reg.build(None) is None


def test_build_without_type_is_a_config_error():
    reg = fresh('widget')
    with pytest.raises(ConfigError) as ei:
        reg.build(dict(x=1), _cfg_path='model')
    msg = str(ei.value)
    assert 'model' in msg and '"type"' in msg and 'widget' in msg


def test_build_optimizer_from_registry():
    from scale_runner.registry import OPTIMIZERS
    params = [torch.nn.Parameter(torch.zeros(2))]
    # (SGD: constructing AdamW & co. imports torch._dynamo, seconds of import time)
    opt = OPTIMIZERS.build(dict(type='SGD', lr=0.01, momentum=0.9), params=params)
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]['lr'] == 0.01 and opt.param_groups[0]['momentum'] == 0.9
    assert OPTIMIZERS.get('AdamW') is torch.optim.AdamW
    opt = OPTIMIZERS.build(dict(type='torch.optim.SGD', lr=0.5), params=params)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]['lr'] == 0.5


# ---- error messages ----------------------------------------------------------------------------
def test_unknown_name_error_names_registry_and_suggests():
    from scale_runner.registry import OPTIMIZERS
    with pytest.raises(KeyError) as ei:
        OPTIMIZERS.get('AdamWW')
    msg = ei.value.args[0]
    assert "'optimizer'" in msg
    assert 'AdamW' in msg.split('Closest registered names:')[1]
    assert 'dotted' in msg and 'custom_imports' in msg


def test_unknown_name_in_build_is_config_error_with_path_and_suggestions():
    from scale_runner.registry import OPTIMIZERS
    with pytest.raises(ConfigError) as ei:
        OPTIMIZERS.build(dict(type='AdamWW', lr=1.0), _cfg_path='optim_wrapper.optimizer',
                         params=[torch.nn.Parameter(torch.zeros(1))])
    msg = str(ei.value)
    assert 'optim_wrapper.optimizer.type' in msg
    assert 'AdamW' in msg and "'optimizer'" in msg
    assert 'dotted' in msg and 'custom_imports' in msg


def test_unknown_name_case_insensitive_suggestion():
    reg = fresh('widget')
    reg.register_module(module=Point)
    with pytest.raises(KeyError) as ei:
        reg.get('point')
    assert 'Point' in ei.value.args[0]


def test_unknown_name_with_nothing_close_still_explains():
    reg = fresh('widget')
    reg.register_module(module=Point)
    with pytest.raises(KeyError) as ei:
        reg.get('CompletelyDifferent')
    msg = ei.value.args[0]
    assert 'widget' in msg and 'CompletelyDifferent' in msg and 'custom_imports' in msg


class TrainThing:
    def __init__(self, max_epochs, val_interval=1, val_begin=1):
        self.max_epochs = max_epochs


def test_rejected_keyword_names_key_path_params_and_suggestion():
    reg = fresh('loop')
    reg.register_module(module=TrainThing)
    with pytest.raises(ConfigError) as ei:
        reg.build(dict(type='TrainThing', max_epoch=3), _cfg_path='train_cfg')
    msg = str(ei.value)
    assert 'train_cfg.max_epoch' in msg
    assert 'accepted parameters' in msg
    for p in ('max_epochs', 'val_interval', 'val_begin'):
        assert p in msg.split('accepted parameters')[1]
    assert 'did you mean' in msg.lower()
    assert 'max_epochs' in msg.lower().split('did you mean')[1]


def test_missing_required_keyword_is_named():
    reg = fresh('loop')
    reg.register_module(module=TrainThing)
    with pytest.raises(ConfigError) as ei:
        reg.build(dict(type='TrainThing', val_interval=2), _cfg_path='train_cfg')
    assert 'train_cfg.max_epochs' in str(ei.value)


def test_rejected_keyword_on_real_epoch_loop(tmp_path):
    from scale_runner.registry import LOOPS
    from scale_runner.runner import Runner
    runner = Runner(model=torch.nn.Linear(2, 2), work_dir=str(tmp_path))
    with pytest.raises(ConfigError) as ei:
        LOOPS.build(dict(type='EpochBasedTrainLoop', max_epoch=3), _cfg_path='train_cfg',
                    runner=runner, dataloader=[1, 2, 3])
    msg = str(ei.value)
    assert 'train_cfg.max_epoch' in msg
    assert 'accepted parameters' in msg and 'val_interval' in msg
    assert 'max_epochs' in msg.lower().split('did you mean')[1]


def test_type_error_inside_constructor_propagates_unchanged():
    reg = fresh()

    @reg.register_module()
    class Broken:
        def __init__(self, a=1):
            raise TypeError('boom from inside')

    with pytest.raises(TypeError) as ei:
        reg.build(dict(type='Broken', a=2), _cfg_path='model')
    assert not isinstance(ei.value, ConfigError)
    assert str(ei.value) == 'boom from inside'


def test_type_error_deep_inside_constructor_propagates_unchanged():
    reg = fresh()

    @reg.register_module()
    class Broken:
        def __init__(self, a=1):
            len(a)  # TypeError: object of type 'int' has no len()

    with pytest.raises(TypeError, match='has no len'):
        reg.build(dict(type='Broken', a=2))


def test_other_exceptions_inside_constructor_propagate():
    reg = fresh()

    @reg.register_module()
    class Broken:
        def __init__(self):
            raise RuntimeError('runtime boom')

    with pytest.raises(RuntimeError, match='runtime boom'):
        reg.build(dict(type='Broken'))


def test_var_kwargs_constructor_accepts_anything():
    reg = fresh()

    @reg.register_module()
    def anything(**kw):
        return kw

    assert reg.build(dict(type='anything', a=1, b=2)) == {'a': 1, 'b': 2}


# ---- root registries ---------------------------------------------------------------------------
ROOTS = ['RUNNERS', 'LOOPS', 'HOOKS', 'MODELS', 'DATASETS', 'DATA_SAMPLERS', 'FUNCTIONS',
         'OPTIMIZERS', 'PARAM_SCHEDULERS', 'METRICS', 'EVALUATORS', 'TRACKERS']


@pytest.mark.parametrize('name', ROOTS)
def test_root_registries_importable(name):
    import scale_runner.registry as r
    reg = getattr(r, name)
    assert isinstance(reg, Registry)
    import scale_runner
    assert getattr(scale_runner, name) is reg


def test_root_registries_are_distinct():
    import scale_runner.registry as r
    regs = [getattr(r, n) for n in ROOTS]
    assert len({id(x) for x in regs}) == len(regs)
    assert len({x.name for x in regs}) == len(regs)


def test_every_torch_optimizer_is_preregistered():
    from scale_runner.registry import OPTIMIZERS
    expected = {n for n in dir(torch.optim)
                if inspect.isclass(getattr(torch.optim, n))
                and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
                and getattr(torch.optim, n) is not torch.optim.Optimizer}
    assert {'SGD', 'Adam', 'AdamW', 'RMSprop', 'Adagrad'} <= expected
    for n in expected:
        assert n in OPTIMIZERS, n
        assert OPTIMIZERS.get(n) is getattr(torch.optim, n)
    assert 'Optimizer' not in OPTIMIZERS


def test_torch_lr_schedulers_are_preregistered():
    from scale_runner.registry import PARAM_SCHEDULERS
    for n in ('StepLR', 'CosineAnnealingLR', 'LinearLR', 'MultiStepLR'):
        assert PARAM_SCHEDULERS.get(n) is getattr(torch.optim.lr_scheduler, n)


# One fresh interpreter (importing torch is the slow part) checks everything that needs a
# process in which no registry has been loaded yet; each test below reads its own lines.
_FRESH_SCRIPT = PARTS_DIR / 'registry_fresh_probe.py'


@pytest.fixture(scope='module')
def fresh_process():
    out = subprocess.run([sys.executable, str(_FRESH_SCRIPT)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}


def test_builtin_loops_resolve_without_importing_scale_runner_loops(fresh_process):
    assert fresh_process['LAZY_MODULES'] == ['False', 'False']
    assert fresh_process['LAZY_LOOPS'] == ['True']
    assert fresh_process['ALL_LOOPS'] == ['True'] * 3


def test_builtin_hooks_and_others_resolve_lazily(fresh_process):
    assert fresh_process['LAZY_HOOKS'] == ['True'] * 4
    assert fresh_process['LAZY_OTHERS'] == ['True'] * 3


def test_user_registration_before_lazy_load_does_not_break_builtins(fresh_process):
    assert fresh_process['EARLY_REGISTER'] == ['True', 'True']


def test_registering_a_builtin_name_before_lazy_load_shadows_it_with_a_warning(fresh_process):
    # MMEngine's tutorial registers its own `Accuracy`: user code may shadow a built-in name
    assert fresh_process['CLASH'] == ['SHADOWED_WITH_WARNING']
    assert fresh_process['CLASH_KEPT'] == ['__main__']


def test_importing_registry_does_not_import_torch():
    code = ('import sys; import scale_runner.registry; '
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == 'False'


def test_builtin_loop_classes_match():
    from scale_runner import loops
    from scale_runner.registry import LOOPS
    assert LOOPS.get('EpochBasedTrainLoop') is loops.EpochBasedTrainLoop
    assert LOOPS.get('IterBasedTrainLoop') is loops.IterBasedTrainLoop


def test_failed_location_import_is_not_silently_remembered(tmp_path, monkeypatch):
    """If a lazy location fails to import, a later lookup must retry (and fail loudly),
    not report an empty registry."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / 'flaky_loc_mod.py').write_text(textwrap.dedent('''
        import os
        if os.environ.get('FLAKY_FAIL') == '1':
            raise ImportError('flaky location failed')
    '''))
    reg = Registry('flaky', locations=['flaky_loc_mod'])
    monkeypatch.setenv('FLAKY_FAIL', '1')
    with pytest.raises(ImportError, match='flaky location failed'):
        'x' in reg
    with pytest.raises(ImportError, match='flaky location failed'):
        len(reg)
