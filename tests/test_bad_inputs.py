"""Bad input, tried as a new user would: every case is a clean ConfigError that names the key
path, the bad value and what is valid (for a misspelt key: the closest accepted name).

Most cases build a Runner from config dicts and call ``train()`` in-process; a few go through
the real CLI, which must exit with code 2 and print the message without a traceback.
"""
from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
from torch import nn

from conftest import PlainRegressor, RegressionData, pythonpath, run_cli
from scale_runner import Runner
from scale_runner.checkpoint import resolve_resume
from scale_runner.config import parse_cli_options, parse_value
from scale_runner.errors import ConfigError, ModelOutputError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / 'configs' / 'spiral_mlp.py')
SMALL = ['train_dataloader.dataset.size=256', 'val_dataloader.dataset.size=64',
         'train_cfg.max_epochs=1']
DELETE = object()


def set_key(parts: dict, path: str, value) -> None:
    """``parts['a']['b'][0]['c'] = value`` for ``path='a.b.0.c'`` (DELETE removes the key)."""
    keys = path.split('.')
    node = parts
    for k in keys[:-1]:
        node = node[int(k)] if isinstance(node, list) else node[k]
    if value is DELETE:
        del node[keys[-1]]
    else:
        node[keys[-1]] = value


def train_error(tiny_parts, work_dir, edits: dict) -> ConfigError:
    parts = tiny_parts(work_dir, default_hooks=dict(checkpoint=None, logger=None),
                       train_cfg=dict(by_epoch=True, max_epochs=1))
    for path, value in edits.items():
        set_key(parts, path, copy.deepcopy(value))
    runner = None
    try:
        with pytest.raises(ConfigError) as ei:
            runner = Runner(**parts)
            runner.train()
    finally:
        if runner is not None:
            runner.close()
    return ei.value


class NoLossModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y=None):
        return {'pred': self.linear(x)}


# (id, {key path: bad value}, substrings the message must contain)
CASES = [
    # ---- dataloader arguments ------------------------------------------------------------------
    ('batch_size_str', {'train_dataloader.batch_size': '8'},
     ["train_dataloader.batch_size = '8'", 'an int >= 1', 'without quotes']),
    ('batch_size_zero', {'train_dataloader.batch_size': 0},
     ['train_dataloader.batch_size = 0', 'an int >= 1']),
    ('batch_size_negative', {'train_dataloader.batch_size': -2},
     ['train_dataloader.batch_size = -2', 'an int >= 1']),
    ('num_workers_negative', {'train_dataloader.num_workers': -1},
     ['train_dataloader.num_workers = -1', 'an int >= 0']),
    ('num_workers_str', {'train_dataloader.num_workers': '2'},
     ["train_dataloader.num_workers = '2'", 'an int >= 0']),
    ('loader_shuffle', {'train_dataloader.shuffle': True},
     ['train_dataloader.shuffle = True', "train_dataloader.sampler=dict(type='DefaultSampler', shuffle=True)"]),
    ('drop_last_str', {'train_dataloader.drop_last': 'yes'},
     ["train_dataloader.drop_last = 'yes'", 'True or False']),
    ('pin_memory_str', {'train_dataloader.pin_memory': 'false'},
     ["train_dataloader.pin_memory = 'false'", 'True or False']),
    ('timeout_negative', {'train_dataloader.timeout': -1},
     ['train_dataloader.timeout = -1', 'a number >= 0']),
    ('prefetch_without_workers', {'train_dataloader.prefetch_factor': 2},
     ['train_dataloader.prefetch_factor = 2', 'train_dataloader.num_workers > 0']),
    ('batch_size_misspelt', {'train_dataloader.batchsize': 8, 'train_dataloader.batch_size': DELETE},
     ['train_dataloader.batchsize = 8', 'did you mean train_dataloader.batch_size?']),
    ('val_batch_size_zero', {'val_dataloader.batch_size': 0},
     ['val_dataloader.batch_size = 0', 'an int >= 1']),
    ('sampler_key_misspelt', {'train_dataloader.sampler.shufle': True},
     ['train_dataloader.sampler.shufle = True', 'did you mean train_dataloader.sampler.shuffle?']),
    ('sampler_shuffle_str', {'train_dataloader.sampler.shuffle': 'yes'},
     ["train_dataloader.sampler.shuffle = 'yes'", 'True or False']),
    ('sampler_type_misspelt', {'train_dataloader.sampler.type': 'DefaultSamplr'},
     ['train_dataloader.sampler.type', "'DefaultSamplr'", 'DefaultSampler']),
    # ---- optimizer arguments ----------------------------------------------------------------------
    ('lr_str', {'optim_wrapper.optimizer.lr': 'fast'},
     ["optim_wrapper.optimizer.lr = 'fast'", 'a number >= 0', 'lr=1e-3']),
    ('lr_negative', {'optim_wrapper.optimizer.lr': -1},
     ['optim_wrapper.optimizer.lr = -1', 'a number >= 0']),
    ('momentum_negative', {'optim_wrapper.optimizer.momentum': -0.5},
     ['optim_wrapper.optimizer.momentum = -0.5', '>= 0']),
    ('weight_decay_str', {'optim_wrapper.optimizer.weight_decay': 'none'},
     ["optim_wrapper.optimizer.weight_decay = 'none'", 'a number']),
    ('betas_range', {'optim_wrapper.optimizer': dict(type='Adam', lr=0.1, betas=(0.9, 1.5))},
     ['optim_wrapper.optimizer.betas = (0.9, 1.5)', 'numbers in [0, 1)']),
    ('betas_length', {'optim_wrapper.optimizer': dict(type='Adam', lr=0.1, betas=(0.9,))},
     ['optim_wrapper.optimizer.betas = (0.9,)', '2 numbers']),
    ('amsgrad_str', {'optim_wrapper.optimizer': dict(type='AdamW', lr=0.1, amsgrad='yes')},
     ["optim_wrapper.optimizer.amsgrad = 'yes'", 'True or False']),
    ('torch_rejects_combination', {'optim_wrapper.optimizer': dict(type='SGD', lr=0.1, nesterov=True)},
     ['optim_wrapper.optimizer', 'SGD', 'Nesterov', 'optim_wrapper.optimizer.nesterov = True']),
    ('optimizer_key_misspelt', {'optim_wrapper.optimizer.lrr': 0.1},
     ['optim_wrapper.optimizer.lrr = 0.1', 'did you mean optim_wrapper.optimizer.lr?']),
    ('optimizer_type_misspelt', {'optim_wrapper.optimizer.type': 'SGDD'},
     ['optim_wrapper.optimizer.type', "'SGDD'", 'SGD']),
    ('optimizer_misspelt', {'optim_wrapper': dict(optimzer=dict(type='SGD', lr=0.1))},
     ['optim_wrapper.optimzer', 'did you mean optim_wrapper.optimizer?']),
    ('optimizer_a_string', {'optim_wrapper.optimizer': 'AdamW'},
     ["optim_wrapper.optimizer = 'AdamW'", "dict(type='AdamW'"]),
    ('optim_wrapper_a_string', {'optim_wrapper': 'AdamW'},
     ["optim_wrapper = 'AdamW'", 'optimizer=dict(']),
    ('clip_grad_misspelt', {'optim_wrapper.clip_grad': dict(max_nrm=1.0)},
     ['optim_wrapper.clip_grad.max_nrm = 1.0', 'did you mean optim_wrapper.clip_grad.max_norm?']),
    ('clip_grad_str', {'optim_wrapper.clip_grad': dict(max_norm='1')},
     ["optim_wrapper.clip_grad.max_norm = '1'", 'a number > 0']),
    # ---- parameter schedulers -------------------------------------------------------------------
    ('scheduler_type_unknown', {'param_scheduler': dict(type='CosineAnnealingLRR', by_epoch=False)},
     ['param_scheduler.type', "'CosineAnnealingLRR'", 'CosineAnnealingLR']),
    ('scheduler_factor_range', {'param_scheduler': dict(type='LinearLR', start_factor=2.0, end=5)},
     ['param_scheduler.start_factor = 2.0', '(0, 1]']),
    ('scheduler_begin_str', {'param_scheduler': dict(type='LinearLR', begin='0', end=5)},
     ["param_scheduler.begin = '0'", 'a number >= 0']),
    ('scheduler_key_misspelt', {'param_scheduler': [dict(type='CosineAnnealingLR', eta_mn=0.0, end=5)]},
     ['param_scheduler[0].eta_mn = 0.0', 'did you mean param_scheduler[0].eta_min?']),
    ('scheduler_value_str', {'param_scheduler': dict(type='CosineAnnealingLR', eta_min='0', end=5)},
     ["param_scheduler.eta_min = '0'", 'a number']),
    ('scheduler_type_key_misspelt', {'param_scheduler': [dict(typ='LinearLR')]},
     ['param_scheduler[0].typ', 'did you mean param_scheduler[0].type?']),
    ('scheduler_by_epoch_str', {'param_scheduler': dict(type='LinearLR', by_epoch='no')},
     ["param_scheduler.by_epoch = 'no'", 'True or False']),
    ('scheduler_step_size_str', {'param_scheduler': dict(type='StepLR', step_size='3')},
     ["param_scheduler.step_size = '3'", 'an int >= 1']),
    ('scheduler_milestones_int', {'param_scheduler': dict(type='MultiStepLR', milestones=5)},
     ['param_scheduler.milestones = 5', 'a list of step numbers']),
    ('scheduler_a_string', {'param_scheduler': 'cosine'},
     ["param_scheduler = 'cosine'", "dict(type='CosineAnnealingLR'"]),
    # ---- train loop --------------------------------------------------------------------------
    ('max_iter_misspelt', {'train_cfg': dict(max_iter=10)},
     ['train_cfg.max_iter = 10', 'did you mean train_cfg.max_iters?']),
    ('max_iter_misspelt_iter_based', {'train_cfg': dict(by_epoch=False, max_iter=10)},
     ['train_cfg.max_iter = 10', 'did you mean train_cfg.max_iters?']),
    ('max_epoch_misspelt', {'train_cfg': dict(max_epoch=2)},
     ['train_cfg.max_epoch = 2', 'did you mean train_cfg.max_epochs?']),
    ('val_interval_misspelt', {'train_cfg': dict(max_epochs=1, val_intervl=2)},
     ['train_cfg.val_intervl = 2', 'did you mean train_cfg.val_interval?', 'EpochBasedTrainLoop']),
    ('max_epochs_str', {'train_cfg.max_epochs': '2'},
     ["train_cfg.max_epochs = '2'", 'a positive int']),
    ('val_interval_str', {'train_cfg.val_interval': 'x'},
     ["train_cfg.val_interval = 'x'", 'an int >= 0']),
    ('by_epoch_str', {'train_cfg.by_epoch': 'no'},
     ["train_cfg.by_epoch = 'no'", 'True', 'False']),
    ('val_cfg_unknown_key', {'val_cfg': dict(fp16=True)},
     ['val_cfg.fp16 = True', 'ValLoop', 'accepted parameters: none']),
    # ---- hooks ------------------------------------------------------------------------------
    ('hook_priority_misspelt', {'custom_hooks': [dict(type='EMAHook', priorty='LOW')]},
     ["custom_hooks[0].priorty = 'LOW'", 'did you mean custom_hooks[0].priority?']),
    ('hook_type_key_misspelt', {'custom_hooks': [dict(typ='EMAHook')]},
     ['custom_hooks[0].typ', 'did you mean custom_hooks[0].type?']),
    ('hook_type_misspelt', {'custom_hooks': [dict(type='EMAHok')]},
     ['custom_hooks[0].type', "'EMAHok'", 'EMAHook']),
    ('hook_priority_unknown', {'custom_hooks': [dict(type='EMAHook', priority='LOWW')]},
     ['custom_hooks[0].priority', "'LOWW'", 'LOW']),
    ('hook_param_misspelt', {'default_hooks': dict(logger=dict(intervl=5))},
     ['default_hooks.logger.intervl = 5', 'did you mean default_hooks.logger.interval?']),
    ('hook_without_params', {'default_hooks': dict(runtime_info=dict(type='RuntimeInfoHook', intervl=3))},
     ['default_hooks.runtime_info.intervl = 3', 'accepted parameters: none', 'priority']),
    ('default_hook_name_misspelt', {'default_hooks': dict(loger=dict(interval=5))},
     ['default_hooks.loger', 'default_hooks.logger']),
    ('custom_hooks_not_a_list', {'custom_hooks': dict(type='EMAHook')},
     ["custom_hooks = {'type': 'EMAHook'}", 'a list']),
    # ---- other sections ---------------------------------------------------------------------
    ('mixed_precision_unknown', {'accelerator': dict(mixed_precision='fp8x')},
     ["accelerator.mixed_precision = 'fp8x'", "'bf16'"]),
    ('accelerator_key_misspelt', {'accelerator': dict(mixed_precison='no')},
     ['accelerator.mixed_precison', 'accelerator.mixed_precision']),
    ('randomness_flag_str', {'randomness': dict(seed=0, deterministic='yes')},
     ["randomness.deterministic = 'yes'", 'True or False']),
    ('randomness_key_misspelt', {'randomness': dict(sed=0)},
     ['randomness.sed', 'randomness.seed']),
    ('experiment_name_int', {'experiment_name': 5},
     ['experiment_name = 5', 'a string']),
]


@pytest.mark.parametrize('edits, expected', [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_a_clear_config_error(tiny_parts, tmp_path, edits, expected):
    msg = str(train_error(tiny_parts, tmp_path / 'work', edits))
    for part in expected:
        assert part in msg, f'{part!r} not in:\n{msg}'
    assert 'Traceback' not in msg


def test_misspelling_is_named_not_only_the_missing_key(tiny_parts, tmp_path):
    """`train_cfg.max_iter` is reported as the misspelling of max_iters (the issue's case that
    suggested val_interval), before the missing key."""
    msg = str(train_error(tiny_parts, tmp_path / 'w', {'train_cfg': dict(max_iter=10)}))
    first = msg.splitlines()[0]
    assert 'train_cfg.max_iter = 10' in first and 'train_cfg.max_iters?' in first
    assert 'val_interval?' not in msg


def test_model_constructor_key_misspelt(tiny_parts, tmp_path):
    from scale_runner import MODELS
    if 'BadInputsRegressor' not in MODELS:
        MODELS.register_module(name='BadInputsRegressor', module=PlainRegressor)
    msg = str(train_error(tiny_parts, tmp_path / 'w',
                          {'model': dict(type='BadInputsRegressor', dimm=4)}))
    assert 'model.dimm = 4' in msg and 'did you mean model.dim?' in msg


def test_dataset_key_misspelt(tiny_parts, tmp_path):
    msg = str(train_error(tiny_parts, tmp_path / 'w',
                          {'train_dataloader': dict(datset=RegressionData(8), batch_size=2)}))
    assert 'train_dataloader.dataset is missing' in msg
    assert 'did you mean train_dataloader.dataset?' in msg and 'train_dataloader.datset' in msg


def test_model_returning_no_loss_is_a_config_error(tiny_parts, tmp_path):
    err = train_error(tiny_parts, tmp_path / 'w', {'model': NoLossModel()})
    assert isinstance(err, ModelOutputError) and isinstance(err, TypeError)
    msg = str(err)
    assert msg.startswith('model:') and "'pred'" in msg and "'loss'" in msg


def test_wrapped_torch_error_keeps_the_original_as_cause(tiny_parts, tmp_path):
    err = train_error(tiny_parts, tmp_path / 'w',
                      {'optim_wrapper.optimizer': dict(type='SGD', lr=0.1, nesterov=True)})
    assert isinstance(err.__cause__, ValueError) and 'Nesterov' in str(err.__cause__)


def test_valid_unusual_values_still_build():
    """The checks refuse only what torch cannot take."""
    import torch
    from scale_runner.data import build_dataloader
    from scale_runner.optim import build_optim_wrapper
    from scale_runner.schedulers import build_param_schedulers
    loader = build_dataloader(dict(dataset=RegressionData(4), batch_size=None, collate_fn=None,
                                   drop_last=False, timeout=0))
    assert len(list(loader)) == 4  # no batching
    model = PlainRegressor()
    wrapper = build_optim_wrapper(dict(optimizer=dict(type='Adam', lr=torch.tensor(0.01),
                                                      betas=[0.8, 0.9], eps=1e-6),
                                       clip_grad=dict(max_norm=1, norm_type='inf')), model)
    scheds = build_param_schedulers([dict(type='LinearLR', start_factor=1, end_factor=0, end=4,
                                          by_epoch=False),
                                     dict(type='MultiStepLR', milestones=[1, 2], gamma=0.5,
                                          begin=4, by_epoch=False)],
                                    wrapper.optimizer, epoch_length=8)
    assert len(scheds) == 2


# ---- resume -------------------------------------------------------------------------------------
@pytest.mark.parametrize('word', ['yes', 'no', 'true', 'false', 'on', 'off', 'YES', 'latest'])
def test_resume_boolean_word_is_refused(tiny_parts, tmp_path, word):
    msg = str(train_error(tiny_parts, tmp_path / 'w', {'resume': word}))
    assert f'resume = {word!r}' in msg
    assert "True" in msg and "False" in msg and "'auto'" in msg and 'checkpoint path' in msg


def test_resume_word_is_refused_even_if_such_a_directory_exists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'yes').mkdir()
    with pytest.raises(ConfigError, match=r'\./yes'):
        resolve_resume('yes')
    assert resolve_resume('./yes') == Path('./yes')


def test_resume_accepted_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'my_ckpt').mkdir()
    assert resolve_resume(True) is True
    assert resolve_resume(False) is False and resolve_resume(None) is False
    assert resolve_resume('auto') == 'auto' and resolve_resume('AUTO') == 'auto'
    assert resolve_resume('my_ckpt') == Path('my_ckpt')  # exists
    # not there (yet): still a path, reported as a checkpoint error when it is read
    assert resolve_resume(str(tmp_path / 'w' / 'checkpoints' / 'epoch_1')) == tmp_path / 'w' / 'checkpoints' / 'epoch_1'
    assert resolve_resume('epoch_3') == Path('epoch_3')
    assert resolve_resume('weights.safetensors') == Path('weights.safetensors')


@pytest.mark.parametrize('value', ['foo', '', 1, 2.5])
def test_resume_other_values_are_refused(tmp_path, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"resume = .*True.*'auto'.*checkpoint path"):
        resolve_resume(value)


# ---- --cfg-options parsing ------------------------------------------------------------------------
@pytest.mark.parametrize('items, expected', [
    (['=5'], ['=5', 'key', 'empty']),
    (['a..b=1'], ['a..b', 'empty part']),
    (['.lr=1'], ['.lr', 'empty part']),
    (['optim_wrapper.=1'], ['optim_wrapper.', 'empty part']),
    (['optim_wrapper.optimizer.betas=[0.9,0.99'], ['optim_wrapper.optimizer.betas=[0.9,0.99', "'['", 'never closed']),
    (['model.dims=(4,8'], ['model.dims=(4,8', "'('", 'never closed']),
    (['model.dims=[4,8]]'], ['model.dims=[4,8]]', 'after the closing']),
    (['model.dims=[4,(8]'], ["does not close the '('"]),
    (['model.cfg={a: 1}'], ['model.cfg={a: 1}', "dict(key=value)"]),
    (['optim_wrapper.optimizer=dict(type=AdamW)'], ['dict(type=AdamW)', 'quoted']),
    (["model.names=['a,b]"], ['never closed']),
    (['model.dims=[4,', '8]'], ['model.dims=[4,', 'quote the whole option']),
])
def test_bad_cli_options_rejected_at_parse_time(items, expected):
    with pytest.raises(ConfigError) as ei:
        parse_cli_options(items)
    msg = str(ei.value)
    assert '--cfg-options' in msg
    for part in expected:
        assert part in msg, f'{part!r} not in {msg!r}'


def test_plain_cli_values_still_work():
    opts = parse_cli_options(['model.name=foo', 'work_dir=/a/b', 'names=[a,b]', "pair=[a, 'b,c']",
                              'x=', 'lr=1e-3', "opt=dict(type='AdamW', lr=1e-3)", "d={'a': 1}",
                              'expr=1+', 'nested=[a,[b,c],(1,2)]'])
    assert opts == {'model.name': 'foo', 'work_dir': '/a/b', 'names': ['a', 'b'],
                    'pair': ['a', 'b,c'], 'x': '', 'lr': 1e-3,
                    'opt': {'type': 'AdamW', 'lr': 1e-3}, 'd': {'a': 1}, 'expr': '1+',
                    'nested': ['a', ['b', 'c'], (1, 2)]}
    assert parse_value('a/b/c.pt') == 'a/b/c.pt'


# ---- through the CLI ------------------------------------------------------------------------------
def _cli_config_error(args, env=None, cwd=None):
    proc = run_cli(args, env=env, cwd=cwd, timeout=120)
    assert proc.returncode == 2, f'exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}'
    assert 'Traceback' not in proc.stderr, proc.stderr
    assert 'scale-runner: config error:' in proc.stderr
    return proc.stderr


def test_cli_unclosed_bracket(tmp_path):
    err = _cli_config_error(['train', CONFIG, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                             'optim_wrapper.optimizer.betas=[0.9,0.99'])
    assert 'optim_wrapper.optimizer.betas=[0.9,0.99' in err and 'never closed' in err
    assert not (tmp_path / 'w').exists()


def test_cli_empty_key_and_debug_traceback(tmp_path):
    args = ['config', CONFIG, '--cfg-options', '=5']
    err = _cli_config_error(args)
    assert "'=5'" in err and 'empty' in err
    for extra_args, env in ((['--debug'], None), ([], {'SCALE_RUNNER_DEBUG': '1'})):
        proc = run_cli(extra_args + args, env=env, timeout=120)
        assert proc.returncode != 0 and 'Traceback' in proc.stderr and 'ConfigError' in proc.stderr


def test_cli_resume_yes(tmp_path):
    err = _cli_config_error(['train', CONFIG, '--work-dir', str(tmp_path / 'w'), '--resume', 'yes'])
    assert "resume = 'yes'" in err and "'auto'" in err and 'checkpoint path' in err


def test_cli_value_passed_to_torch_and_unknown_scheduler(tmp_path):
    err = _cli_config_error(['train', CONFIG, '--work-dir', str(tmp_path / 'w'), '--cfg-options',
                             *SMALL, "train_dataloader.batch_size='8'"])
    assert "train_dataloader.batch_size = '8'" in err and 'an int >= 1' in err
    err = _cli_config_error(['train', CONFIG, '--work-dir', str(tmp_path / 'w2'), '--cfg-options',
                             *SMALL, "param_scheduler=dict(type='CosineAnnealingLRR')"])
    assert 'param_scheduler.type' in err and "'CosineAnnealingLRR'" in err
    assert 'CosineAnnealingLR,' in err


def test_cli_model_returning_no_loss(tmp_path):
    cfg = tmp_path / 'noloss.py'  # noloss_models: tests/parts/noloss_models.py
    cfg.write_text(textwrap.dedent(f'''
        _base_ = [{CONFIG!r}]
        custom_imports = dict(imports=['scale_runner.examples.toy', 'noloss_models'])
        model = dict(_delete_=True, type='NoLossMLP')
    '''))
    env = {'PYTHONPATH': pythonpath()}
    err = _cli_config_error(['train', str(cfg), '--work-dir', str(tmp_path / 'w'),
                             '--cfg-options', *SMALL], env=env)
    assert "model: the model returned a dict with keys ['logits']" in err and "'loss'" in err
