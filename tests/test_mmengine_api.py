"""MMEngine's documented API with only the imports changed (issue 21): runner arguments, the
message hub, log_processor, checkpoint and scheduler conventions, data preprocessors,
DictAction, registry shadowing, load_from + resume. Each test is written from MMEngine's
documented behaviour, on real (tiny) training runs."""
from __future__ import annotations

import argparse
import json
import math
import warnings

import pytest
import torch
from conftest import RegressionData
from sr_models import PlainRegressor
from torch import nn

from scale_runner import ConfigError, Hook, Runner
from scale_runner.registry import METRICS

QUIET = dict(log_level='WARNING')


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, x, y):
        return {'loss': nn.functional.mse_loss(self.linear(x), y)}


def _parts(tmp_path, **over):
    parts = dict(model=Regressor(), work_dir=str(tmp_path),
                 train_dataloader=dict(dataset=RegressionData(32), batch_size=8),
                 train_cfg=dict(by_epoch=True, max_epochs=2),
                 optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
                 default_hooks=dict(checkpoint=None), randomness=dict(seed=0), **QUIET)
    parts.update(over)
    return parts


# ---- Runner(launcher=..., env_cfg=..., log_processor=...) ----------------------------------
def test_runner_takes_launcher_env_cfg_and_log_processor_as_keywords(tmp_path):
    with Runner(**_parts(tmp_path, launcher='none',
                         env_cfg=dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork'),
                                      dist_cfg=dict(backend='gloo')),
                         log_processor=dict(window_size=4, by_epoch=True))) as runner:
        runner.train()
        assert runner.launcher == 'none' and runner.log_processor.window_size == 4
        assert torch.backends.cudnn.benchmark is False


def test_launcher_env_cfg_log_processor_from_a_config(tmp_path):
    cfg = dict(_parts(tmp_path), launcher='pytorch', env_cfg=dict(cudnn_benchmark=False),
               log_processor=dict(by_epoch=False))
    cfg['model'] = dict(type=Regressor)
    with Runner.from_cfg(cfg) as runner:
        assert runner.launcher == 'pytorch' and runner.log_processor.by_epoch is False


@pytest.mark.parametrize('over, words', [
    (dict(launcher='pytoch'), ["launcher = 'pytoch'", "'pytorch'"]),
    (dict(env_cfg=dict(cudnn_benchmrk=True)), ['env_cfg.cudnn_benchmrk', 'env_cfg.cudnn_benchmark']),
    (dict(env_cfg=dict(dist_cfg=dict(backnd='nccl'))), ['env_cfg.dist_cfg.backnd', 'backend']),
    (dict(log_processor=dict(windw_size=5)), ['log_processor.windw_size', 'log_processor.window_size']),
    (dict(log_processor=dict(custom_cfg=[dict(data_src='loss', method_name='avg')])),
     ["log_processor.custom_cfg[0].method_name = 'avg'", 'mean']),
])
def test_bad_mmengine_runner_arguments_name_the_key(tmp_path, over, words):
    with pytest.raises(ConfigError) as e:
        Runner(**_parts(tmp_path, **over))
    for w in words:
        assert w in str(e.value)


# ---- message hub and RuntimeInfoHook -----------------------------------------------------
class HubReader(Hook):
    priority = 'LOW'

    def __init__(self):
        self.seen = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        hub = runner.message_hub
        self.seen.append((hub.get_info('iter'), hub.get_info('epoch'), hub.get_info('max_iters'),
                          hub.get_scalar('train/lr').current(), hub.get_scalar('train/loss').current(),
                          float(outputs['loss'])))

    def after_val_epoch(self, runner, metrics=None):
        self.val = runner.message_hub.get_scalar('val/mse').current()


def test_runtime_info_hook_fills_the_runners_own_message_hub(tmp_path, tiny_parts):
    reader = HubReader()
    sched = dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=3)
    with Runner(**tiny_parts(tmp_path, custom_hooks=[reader], param_scheduler=sched,
                             default_hooks=dict(checkpoint=None))) as runner:
        metrics = runner.train()
        assert type(runner.get_hook('RuntimeInfoHook')).__name__ == 'RuntimeInfoHook'
        other = Runner(**tiny_parts(tmp_path / 'b'))
        assert other.message_hub is not runner.message_hub  # no process-wide singleton
        assert runner.message_hub.get_info('experiment_name') == runner.experiment_name
        assert runner.message_hub.get_info('seed') == runner.seed
    assert [s[0] for s in reader.seen] == list(range(1, 17))  # counters of completed work
    assert [s[1] for s in reader.seen] == [0] * 8 + [1] * 8
    assert all(s[2] == 16 for s in reader.seen)
    # the lr the iteration used: [0, 3) warmup from 0.5 * 0.05
    assert [s[3] for s in reader.seen[:4]] == pytest.approx([0.025, 0.0375, 0.05, 0.05])
    assert all(s[4] == pytest.approx(s[5]) for s in reader.seen)  # the output's loss
    assert reader.val == pytest.approx(metrics['mse'])
    with pytest.raises(KeyError, match='train/loss'):
        runner.message_hub.get_scalar('train/los')


def test_message_hub_keeps_tensors_until_read():
    from scale_runner import MessageHub
    hub = MessageHub()
    for v in (1.0, 2.0, 3.0, 6.0):
        hub.update_scalar('train/loss', torch.tensor(v))
    buf = hub.get_scalar('train/loss')
    assert buf._pending and not buf._floats  # nothing converted yet
    assert buf.current() == 6.0 and buf.mean() == 3.0 and buf.mean(2) == 4.5
    assert buf.min() == 1.0 and buf.max(3) == 6.0
    hub.update_scalars({'train/acc': dict(value=3.0, count=2)})
    assert hub.get_scalar('train/acc').mean() == 1.5  # sum / count, as MMEngine's HistoryBuffer
    hub.update_info('note', 'x')
    assert hub.get_info('note') == 'x' and hub.get_info('missing', 7) == 7
    from scale_runner import HistoryBuffer
    short = HistoryBuffer(max_length=8)
    for v in range(1000):
        short.update(float(v))
    assert len(short) == 8 and short.mean() == sum(range(992, 1000)) / 8


def test_runtime_info_survives_resume(tmp_path, tiny_parts):
    class Note(Hook):
        def after_train_epoch(self, runner):
            runner.message_hub.update_info('my_note', runner.epoch)
    over = dict(default_hooks=dict(checkpoint=dict(interval=1)), custom_hooks=[Note()])
    with Runner(**tiny_parts(tmp_path, **over)) as runner:
        runner.train()
    over['train_cfg'] = dict(by_epoch=True, max_epochs=2)
    with Runner(**tiny_parts(tmp_path, resume=True, custom_hooks=[], default_hooks=over['default_hooks'])) as r2:
        r2.train()  # nothing left to train: the state comes from the checkpoint
        assert r2.message_hub.get_info('my_note') == 2


# ---- log_processor -------------------------------------------------------------------------
def test_log_processor_window_and_custom_cfg(tmp_path):
    proc = dict(window_size=2, by_epoch=False, num_digits=6,
                custom_cfg=[dict(data_src='loss', method_name='mean', window_size='global',
                                 log_name='loss_global'),
                            dict(data_src='loss', method_name='max', window_size=4, log_name='loss_max')])
    losses = []

    class Losses(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            losses.append(float(outputs['loss']))
    with Runner(**_parts(tmp_path, log_processor=proc, custom_hooks=[Losses()], log_level='INFO',
                         default_hooks=dict(checkpoint=None, logger=dict(interval=4)))) as runner:
        runner.train()
        log_dir = runner.log_dir
    rows = [json.loads(line) for line in (log_dir / 'scalars.jsonl').read_text().splitlines()]
    train = [r for r in rows if 'loss' in r]
    assert [r['step'] for r in train] == [4, 8]
    for r in train:
        n = r['step']
        assert r['loss'] == pytest.approx(sum(losses[n - 2:n]) / 2)        # window_size=2
        assert r['loss_global'] == pytest.approx(sum(losses[:n]) / n)     # 'global'
        assert r['loss_max'] == pytest.approx(max(losses[n - 4:n]))
    text = (log_dir / f'{log_dir.name}.log').read_text()
    assert 'Iter(train) [4/8]' in text  # by_epoch=False in an epoch loop: iteration lines
    assert f'loss: {train[0]["loss"]:.6f}' in text  # num_digits=6


def test_log_processor_unknown_data_src_names_the_available(tmp_path):
    proc = dict(custom_cfg=[dict(data_src='los', method_name='mean')])
    with pytest.raises(ConfigError, match=r"custom_cfg\[0\].data_src = 'los'.*Did you mean 'loss'"):
        Runner(**_parts(tmp_path, log_processor=proc,
                        default_hooks=dict(checkpoint=None, logger=dict(interval=1)))).train()


# ---- CheckpointHook(save_begin=...) --------------------------------------------------------
def test_checkpoint_interval_counts_from_save_begin(tmp_path):
    with Runner(**_parts(tmp_path, train_cfg=dict(by_epoch=True, max_epochs=6),
                         default_hooks=dict(checkpoint=dict(save_begin=3, interval=2,
                                                            max_keep_ckpts=-1)))) as runner:
        runner.train()
    saved = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name != 'latest')
    assert saved == ['epoch_3', 'epoch_5', 'epoch_6']  # MMEngine: 3, 5 and the last


# ---- parameter schedulers: [begin, end) ----------------------------------------------------
class LrLog(Hook):
    def __init__(self):
        self.lrs = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.lrs.append(runner.optim_wrapper.get_lr()['lr'][0])


def _lrs(tmp_path, sched, max_iters=14, optimizer=None):
    log = LrLog()
    optim = dict(optimizer=optimizer or dict(type='SGD', lr=1.0))
    with Runner(**_parts(tmp_path, train_cfg=dict(by_epoch=False, max_iters=max_iters),
                         optim_wrapper=optim, param_scheduler=sched, custom_hooks=[log])) as r:
        r.train()
    return log.lrs


def test_linear_lr_reaches_the_base_lr_at_end_minus_one(tmp_path):
    lrs = _lrs(tmp_path, dict(type='LinearLR', start_factor=0.25, by_epoch=False, begin=0, end=4),
               max_iters=6)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_cosine_is_active_for_begin_to_end_exclusive(tmp_path):
    lrs = _lrs(tmp_path, dict(type='CosineAnnealingLR', by_epoch=False, begin=4, end=12, eta_min=0.0))
    expected = [1.0] * 4 + [(1 + math.cos(math.pi * k / 8)) / 2 for k in range(8)]
    expected += [expected[-1]] * 2  # no step at 12 (nor after): the step-11 value stays
    assert lrs == pytest.approx(expected)
    assert lrs[-1] > 0  # eta_min would be step 12's value


def test_a_built_torch_scheduler_steps_per_epoch(tmp_path):
    model = Regressor()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.5)
    log = LrLog()
    with Runner(**_parts(tmp_path, model=model, train_cfg=dict(by_epoch=True, max_epochs=3),
                         optim_wrapper=dict(optimizer=opt), param_scheduler=sched,
                         custom_hooks=[log])) as r:
        r.train()
    assert log.lrs == pytest.approx([1.0] * 4 + [0.5] * 4 + [0.25] * 4)


def test_a_built_scheduler_of_another_optimizer_is_refused(tmp_path):
    other = torch.optim.SGD(Regressor().parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    with pytest.raises(ConfigError, match='another optimizer'):
        Runner(**_parts(tmp_path, param_scheduler=sched)).train()


# ---- registry: a user's Accuracy shadows the built-in ---------------------------------------
def test_user_metric_named_like_a_builtin_shadows_it_with_a_warning(tmp_path, tiny_parts):
    builtin = METRICS.get('Accuracy')
    try:
        with pytest.warns(UserWarning, match="'Accuracy' in the 'metric' registry now names your"):
            @METRICS.register_module()
            class Accuracy:  # MMEngine's tutorial registers its own Accuracy
                pass
        assert METRICS.get('Accuracy') is Accuracy
        class Other:
            pass
        Other.__name__ = Other.__qualname__ = 'Accuracy'
        with pytest.raises(KeyError, match='force=True'):  # a second user class: still a clash
            METRICS.register_module(module=Other)
    finally:
        METRICS.register_module(name='Accuracy', module=builtin, force=True)


# ---- load_from + resume=True ---------------------------------------------------------------
def test_load_from_with_resume_true_resumes_from_it_with_a_warning(tmp_path, tiny_parts):
    with Runner(**tiny_parts(tmp_path / 'a', default_hooks=dict(checkpoint=dict(interval=1)))) as r:
        r.train()
    ckpt = tmp_path / 'a' / 'checkpoints' / 'epoch_1'
    with pytest.warns(UserWarning, match='resuming from load_from'):
        r2 = Runner(**tiny_parts(tmp_path / 'b', load_from=str(ckpt), resume=True))
    with r2:
        r2.train()
        assert r2.iter == 16  # continued from epoch 1 (8 iterations), not from scratch


# ---- BaseModel.data_preprocessor and parse_losses ------------------------------------------


def test_img_data_preprocessor_moves_casts_and_normalizes(tmp_path):
    from scale_runner import BaseModel, ImgDataPreprocessor
    seen = []

    class Net(BaseModel):
        def __init__(self):
            super().__init__(data_preprocessor=dict(type='ImgDataPreprocessor', mean=[10, 20, 30],
                                                    std=[2, 4, 5], bgr_to_rgb=True,
                                                    pad_size_divisor=4))
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, inputs, data_samples=None, mode='tensor'):
            seen.append(inputs)
            logits = self.fc(inputs.flatten(1))
            if mode == 'loss':
                return {'loss_ce': nn.functional.cross_entropy(logits, data_samples),
                        'acc': (logits.argmax(1) == data_samples).float().mean()}
            return logits

    class Imgs(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            img = torch.full((3, 3, 3), 0, dtype=torch.uint8)
            img[0], img[1], img[2] = 30, 20, 10  # BGR
            return {'inputs': img, 'data_samples': torch.tensor(i % 2)}

    model = Net()
    assert isinstance(model.data_preprocessor, ImgDataPreprocessor)
    assert 'data_preprocessor.mean' not in model.state_dict()  # checkpoints stay the model's
    with Runner(**_parts(tmp_path, model=model, train_dataloader=dict(dataset=Imgs(), batch_size=4),
                         train_cfg=dict(by_epoch=False, max_iters=2))) as r:
        r.train()
    x = seen[0]
    assert x.dtype == torch.float32 and x.shape == (4, 3, 4, 4)  # padded 3x3 -> 4x4
    assert torch.allclose(x[0, :, 0, 0], torch.zeros(3))  # flipped to RGB, then (x - mean) / std
    assert torch.all(x[0, :, 3, :] == 0)  # the padding
    loss, log_vars = model.parse_losses({'loss_a': torch.tensor(1.0), 'loss_b': torch.tensor(2.0),
                                         'acc': torch.tensor(0.5)})
    assert float(loss) == 3.0 and set(log_vars) == {'loss_a', 'loss_b', 'acc', 'loss'}


def test_base_data_preprocessor_follows_the_model_device_and_keeps_structure():
    from scale_runner import BaseDataPreprocessor, BaseModel

    class M(BaseModel):
        def forward(self, *a, **k):
            return None

    m = M()
    assert isinstance(m.data_preprocessor, BaseDataPreprocessor)
    batch = {'x': torch.ones(2), 'meta': ['a', 'b'], 'pair': (torch.zeros(1), 3)}
    out = m.data_preprocessor(batch, True)
    assert out['meta'] == ['a', 'b'] and out['pair'][1] == 3 and out['x'].device == m.data_preprocessor.device
    with pytest.raises(ConfigError, match='model.data_preprocessor'):
        M.__init__(M(), data_preprocessor=42)


# ---- DictAction --------------------------------------------------------------------------
def test_dict_action_parses_cfg_options_like_mmengine():
    from scale_runner import Config, DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    args = parser.parse_args(['--cfg-options', 'optim_wrapper.optimizer.lr=0.01',
                              'train_cfg.max_epochs=3', 'model.dims=4,8', "work_dir='w d'",
                              'flag=true', '--cfg-options', 'extra=[1,(2,3)]'])
    assert args.cfg_options == {'optim_wrapper.optimizer.lr': 0.01, 'train_cfg.max_epochs': 3,
                                'model.dims': [4, 8], 'work_dir': 'w d', 'flag': True,
                                'extra': [1, (2, 3)]}
    cfg = Config(dict(optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)), train_cfg=dict()))
    cfg.merge_from_dict(args.cfg_options)
    assert cfg.optim_wrapper.optimizer.lr == 0.01 and cfg.train_cfg.max_epochs == 3
    with pytest.raises(SystemExit), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        parser.parse_args(['--cfg-options', 'novalue'])


# ---- the 15-minute tutorial, rewritten --------------------------------------------------------
def test_mmengine_tutorial_example_trains(tmp_path):
    from scale_runner.examples.mmengine_tutorial import main
    metrics = main(str(tmp_path), log_level='WARNING')  # the tutorial's 5 epochs
    assert float(metrics["accuracy"]) > 50  # ten classes: chance is 10
    assert (tmp_path / 'checkpoints' / 'epoch_5').is_dir()


def test_plain_modules_still_train(tmp_path, tiny_parts):
    with Runner(**tiny_parts(tmp_path, model=PlainRegressor())) as r:
        assert r.train()['mse'] >= 0
