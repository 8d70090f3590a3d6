"""MMEngine's optimizer-wrapper API (issue 21): paramwise_cfg, constructor=, clip_grad types,
OptimWrapperDict with a GAN-style train_step, and its exact resume."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import RegressionData
from torch import nn

from scale_runner import BaseModel, ConfigError, OptimWrapper, OptimWrapperDict, Runner
from scale_runner.optim import build_optim_wrapper
from scale_runner.registry import OPTIM_WRAPPER_CONSTRUCTORS


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 2)


def _group_of(wrapper, param) -> dict:
    return next(g for g in wrapper.optimizer.param_groups if any(p is param for p in g['params']))


# ---- paramwise_cfg ---------------------------------------------------------------------------
def test_paramwise_cfg_bias_norm_and_custom_keys():
    net = Net()
    wrapper = build_optim_wrapper(dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-2, momentum=0.9),
        paramwise_cfg=dict(bias_decay_mult=0.0, norm_decay_mult=0.5,
                           custom_keys={'head': dict(lr_mult=0.1, decay_mult=2.0)})), net)
    conv, bn = net.backbone[0], net.backbone[1]
    g = _group_of(wrapper, conv.weight)
    assert g['lr'] == pytest.approx(0.1) and g['weight_decay'] == pytest.approx(1e-2)
    assert _group_of(wrapper, conv.bias)['weight_decay'] == 0.0           # bias_decay_mult
    assert _group_of(wrapper, bn.weight)['weight_decay'] == pytest.approx(5e-3)  # norm first
    assert _group_of(wrapper, bn.bias)['weight_decay'] == pytest.approx(5e-3)
    for p in net.head.parameters():                                       # custom key wins
        g = _group_of(wrapper, p)
        assert g['lr'] == pytest.approx(0.01) and g['weight_decay'] == pytest.approx(2e-2)
    n_params = sum(len(g['params']) for g in wrapper.optimizer.param_groups)
    assert n_params == len(list(net.parameters()))  # every parameter once


def test_paramwise_longest_custom_key_wins_and_typos_are_errors():
    net = Net()
    wrapper = build_optim_wrapper(dict(
        optimizer=dict(type='SGD', lr=1.0),
        paramwise_cfg=dict(custom_keys={'backbone': dict(lr_mult=0.5),
                                        'backbone.0': dict(lr_mult=0.25)})), net)
    assert _group_of(wrapper, net.backbone[0].weight)['lr'] == 0.25
    assert _group_of(wrapper, net.backbone[1].weight)['lr'] == 0.5
    with pytest.raises(ConfigError, match=r"custom_keys\['haed'\] matches no parameter"):
        build_optim_wrapper(dict(optimizer=dict(type='SGD', lr=1.0),
                                 paramwise_cfg=dict(custom_keys={'haed': dict(lr_mult=0.1)})), net)
    with pytest.raises(ConfigError, match='paramwise_cfg.norm_decay_mul.*norm_decay_mult'):
        build_optim_wrapper(dict(optimizer=dict(type='SGD', lr=1.0),
                                 paramwise_cfg=dict(norm_decay_mul=0.0)), net)
    with pytest.raises(ConfigError, match=r"custom_keys\['head'\].lr_mul.*lr_mult"):
        build_optim_wrapper(dict(optimizer=dict(type='SGD', lr=1.0),
                                 paramwise_cfg=dict(custom_keys={'head': dict(lr_mul=0.1)})), net)


# ---- constructor= ------------------------------------------------------------------------------
def test_custom_constructor_by_name():
    from scale_runner import DefaultOptimWrapperConstructor

    @OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
    class FrozenBackboneConstructor(DefaultOptimWrapperConstructor):
        def __call__(self, model):
            for p in model.backbone.parameters():
                p.requires_grad_(False)
            return super().__call__(model)

    net = Net()
    wrapper = build_optim_wrapper(dict(constructor='FrozenBackboneConstructor',
                                       optimizer=dict(type='SGD', lr=0.1)), net)
    assert isinstance(wrapper, OptimWrapper)
    assert not net.backbone[0].weight.requires_grad
    with pytest.raises(ConfigError, match="optim_wrapper.constructor.*'FrozenBackboneConstructr'"):
        build_optim_wrapper(dict(constructor='FrozenBackboneConstructr',
                                 optimizer=dict(type='SGD', lr=0.1)), net)


# ---- clip_grad=dict(type=...) -----------------------------------------------------------------
def _clipped_step(clip_grad):
    torch.manual_seed(0)
    lin = nn.Linear(3, 1)
    before = [p.detach().clone() for p in lin.parameters()]
    wrapper = build_optim_wrapper(dict(optimizer=dict(type='SGD', lr=1.0), clip_grad=clip_grad), lin)
    loss = (lin(torch.full((4, 3), 100.0)) ** 2).mean()
    wrapper.update_params(loss)
    return wrapper, [(p.detach() - b) for p, b in zip(lin.parameters(), before)]


def test_clip_grad_type_value_and_norm():
    _, deltas = _clipped_step(dict(type='value', clip_value=0.01))
    assert max(float(d.abs().max()) for d in deltas) == pytest.approx(0.01)
    wrapper, deltas = _clipped_step(dict(type='norm', max_norm=0.5, norm_type=2))
    assert float(torch.cat([d.flatten() for d in deltas]).norm()) == pytest.approx(0.5, rel=1e-4)
    assert float(wrapper.grad_norm) > 0.5  # the norm before clipping


@pytest.mark.parametrize('clip, words', [
    (dict(type='vaule', clip_value=1.0), ["clip_grad.type = 'vaule'", "'value'"]),
    (dict(type='value', max_norm=1.0), ["type='value' needs clip_value"]),
    (dict(type='norm', clip_value=1.0), ["type='norm' needs max_norm"]),
])
def test_clip_grad_type_errors(clip, words):
    with pytest.raises(ConfigError) as e:
        build_optim_wrapper(dict(optimizer=dict(type='SGD', lr=1.0), clip_grad=clip), nn.Linear(2, 1))
    for w in words:
        assert w in str(e.value)


# ---- OptimWrapperDict: GAN-style training --------------------------------------------------------
class TinyGAN(BaseModel):
    """A generator that maps noise to 4-d samples and a discriminator that tells them from the
    data; MMEngine's GAN ``train_step`` pattern with one wrapper per sub-module."""

    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x, y=None, mode='tensor'):
        return self.discriminator(x)

    def train_step(self, data, optim_wrapper):
        data = self.data_preprocessor(data, True)
        real = data['x']
        noise = torch.randn(real.shape[0], 2)
        bce = nn.functional.binary_cross_entropy_with_logits
        d_wrapper, g_wrapper = optim_wrapper['discriminator'], optim_wrapper['generator']
        with d_wrapper.optim_context(self.discriminator):
            fake = self.generator(noise).detach()
            d_real, d_fake = self.discriminator(real), self.discriminator(fake)
            loss_d = bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake))
        d_wrapper.update_params(loss_d)
        # as MMEngine's GAN tutorial: the generator's loss leaves no gradient in the
        # discriminator (it would carry into its next update, and into no checkpoint)
        self.discriminator.requires_grad_(False)
        with g_wrapper.optim_context(self.generator):
            d_gen = self.discriminator(self.generator(noise))
            loss_g = bce(d_gen, torch.ones_like(d_gen))
        g_wrapper.update_params(loss_g)
        self.discriminator.requires_grad_(True)
        return dict(loss_d=loss_d.detach(), loss_g=loss_g.detach())


GAN_OPTIM = dict(generator=dict(optimizer=dict(type='Adam', lr=1e-3, betas=(0.5, 0.999))),
                 discriminator=dict(optimizer=dict(type='Adam', lr=4e-3, betas=(0.5, 0.999)),
                                    clip_grad=dict(type='norm', max_norm=1.0)))


def _gan_runner(work_dir, max_iters=8, **over):
    torch.manual_seed(0)  # the same initial weights in every run
    parts = dict(model=TinyGAN(), work_dir=str(work_dir), log_level='WARNING',
                 train_dataloader=dict(dataset=RegressionData(32), batch_size=4,
                                       sampler=dict(type='DefaultSampler', shuffle=True)),
                 train_cfg=dict(by_epoch=False, max_iters=max_iters),
                 optim_wrapper=GAN_OPTIM,
                 param_scheduler=dict(generator=[dict(type='LinearLR', start_factor=0.5,
                                                      by_epoch=False, begin=0, end=4)],
                                      discriminator=dict(type='StepLR', step_size=3, gamma=0.5,
                                                         by_epoch=False)),
                 default_hooks=dict(checkpoint=dict(interval=4), logger=dict(interval=2)),
                 randomness=dict(seed=3))
    parts.update(over)
    return Runner(**parts)


def test_optim_wrapper_dict_trains_each_submodule_with_its_own_optimizer(tmp_path):
    with _gan_runner(tmp_path) as runner:
        runner.train()
        wrapper = runner.optim_wrapper
        assert isinstance(wrapper, OptimWrapperDict) and list(wrapper) == ['generator', 'discriminator']
        g_params = {id(p) for p in runner.model.generator.parameters()}
        assert {id(p) for g in wrapper['generator'].param_groups for p in g['params']} == g_params
        assert wrapper['generator'].update_count == wrapper['discriminator'].update_count == 8
        lrs = wrapper.get_lr()
        assert set(lrs) == {'generator.lr', 'discriminator.lr'}
        assert lrs['generator.lr'][0] == pytest.approx(1e-3)      # warmup over [0, 4)
        assert lrs['discriminator.lr'][0] == pytest.approx(1e-3)  # 4e-3 halved at 3 and 6
        hub = runner.message_hub
        assert hub.get_scalar('train/loss_d').current() > 0
        assert hub.get_scalar('train/generator.lr').current() == pytest.approx(1e-3)
        with pytest.raises(NotImplementedError, match=r"optim_wrapper\[name\].update_params"):
            wrapper.update_params(torch.tensor(1.0))
        with pytest.raises(KeyError, match="Did you mean 'generator'"):
            wrapper['generatr']
        log = (runner.log_dir / 'scalars.jsonl').read_text()
    assert '"generator.lr"' in log and '"loss_g"' in log


def test_gan_resume_is_exact(tmp_path):
    with _gan_runner(tmp_path / 'straight') as straight:
        straight.train()
        want_w = {k: v.clone() for k, v in straight.model.state_dict().items()}
        want_opt = straight.optim_wrapper.state_dict()
    with _gan_runner(tmp_path / 'split', max_iters=4) as first:
        first.train()
    with _gan_runner(tmp_path / 'split', resume=True) as second:
        second.train()
        got_w = second.model.state_dict()
        got_opt = second.optim_wrapper.state_dict()
    for k, want in want_w.items():
        assert torch.equal(want, got_w[k]), k
    for name in ('generator', 'discriminator'):
        a, b = want_opt[name], got_opt[name]
        assert a['update_count'] == b['update_count'] == 8
        assert json.dumps(a['param_groups']) == json.dumps(b['param_groups'])  # (JSON: tuples are lists)
        for i, moments in a['state'].items():
            for key, value in moments.items():
                assert torch.equal(torch.as_tensor(value),
                                   torch.as_tensor(b['state'][i][key])), (name, i, key)


def test_optim_wrapper_dict_of_built_wrappers_and_errors(tmp_path):
    model = TinyGAN()
    built = dict(generator=OptimWrapper(torch.optim.SGD(model.generator.parameters(), lr=0.1)),
                 discriminator=OptimWrapper(torch.optim.SGD(model.discriminator.parameters(), lr=0.1)))
    with _gan_runner(tmp_path, model=model, optim_wrapper=built, param_scheduler=None,
                     max_iters=2) as runner:
        runner.train()
        assert runner.optim_wrapper['generator'] is built['generator']
    with pytest.raises(ConfigError, match="no sub-module 'generatr'.*Did you mean 'generator'"):
        build_optim_wrapper(dict(generatr=dict(optimizer=dict(type='SGD', lr=0.1))), TinyGAN())
    with pytest.raises(ConfigError, match="param_scheduler.gen is not an optimizer wrapper"):
        _gan_runner(tmp_path / 'b', param_scheduler=dict(gen=dict(type='StepLR', step_size=1))).train()
