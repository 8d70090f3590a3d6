"""tests/test_fsdp_config.py's job, run on 2 CPU ranks by ``torch.distributed.run``: a Runner
from a config with ``accelerator=dict(fsdp=...)`` trains FSDP2-sharded, and every rank checks
its sharded result against the same training done unsharded in plain torch.

argv: the work directory, then the ``accelerator`` section as JSON. Each rank writes its
findings to ``result_rank<r>.json`` there (two ranks' prints can interleave on one pipe).
"""

import json
import sys
from pathlib import Path

import torch

import scale_runner.examples.toy  # noqa: F401  (registers MLPClassifier, SpiralDataset)
from scale_runner import Runner
from scale_runner.examples.toy import MLPClassifier, SpiralDataset
from scale_runner.hooks.hook import Hook

MODEL = dict(hidden=16, depth=2)
LR, MAX_NORM, ITERS = 0.05, 1.0, 6


class FSDPProbe(Hook):
    """Records what the run's FSDP2 model, optimizer and batches are, for the checks below."""

    def before_train(self, runner):
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
        model, opt = runner.model, runner.optim_wrapper.optimizer
        params = list(model.parameters())
        self.facts = dict(
            model_type=type(model).__name__,
            fsdp_module=isinstance(model, FSDPModule),
            all_dtensor=all(isinstance(p, DTensor) for p in params),
            # each rank holds half of the first layer's rows: really sharded, not replicated
            local_rows=[p.to_local().shape[0] for p in params][:1],
            optimizer_type=type(opt).__name__,  # Accelerate's AcceleratedOptimizer
            optimizer_over_model_params={id(p) for g in opt.param_groups for p in g['params']}
            == {id(p) for p in params})
        self.init = _full(model)
        self.batches = []
        # the dtype a sharded layer computes in: bf16 under accelerator.mixed_precision='bf16'
        layer = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
        layer.register_forward_hook(self._record_dtype)

    def _record_dtype(self, module, args, out):
        self.facts.setdefault('compute_dtype', str(out.dtype))

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.batches.append({k: v.clone() for k, v in data_batch.items()})


def _full(model):
    return {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}


def reference(init, batches_per_rank):
    """The same training unsharded: the mean of the ranks' losses per iteration (what FSDP2's
    gradient averaging computes), AdamW after clipping the full gradients."""
    model = MLPClassifier(**MODEL)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in zip(*batches_per_rank):
        loss = sum(model(**b, mode='loss')['loss'] for b in step) / len(step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        opt.step()
        opt.zero_grad()
    return model.state_dict()


def data_loss(weights) -> float:
    model = MLPClassifier(**MODEL)
    model.load_state_dict(weights)
    data = SpiralDataset(size=64, seed=1)
    with torch.no_grad():
        return float(model(data.inputs, data.labels, mode='loss')['loss'])


def main(work_dir, accelerator):
    probe = FSDPProbe()
    runner = Runner.from_cfg(dict(
        model=dict(type='MLPClassifier', **MODEL), work_dir=work_dir, experiment_name='run',
        train_dataloader=dict(dataset=dict(type='SpiralDataset', size=64, seed=1), batch_size=8,
                              sampler=dict(type='DefaultSampler', shuffle=True)),
        train_cfg=dict(by_epoch=False, max_iters=ITERS),
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=LR), clip_grad=dict(max_norm=MAX_NORM)),
        accelerator=accelerator, default_hooks=dict(checkpoint=None, logger=dict(interval=1)),
        randomness=dict(seed=0), log_level='INFO'))
    runner.register_hook(probe)
    runner.train()
    final = _full(runner.model)
    world = torch.distributed.get_world_size()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, (probe.batches, final))
    expected = reference(probe.init, [b for b, _ in gathered])
    facts = dict(probe.facts,
                 rank=runner.accelerator.process_index,
                 distributed_type=str(runner.accelerator.distributed_type),
                 iters=runner.iter, updates=runner.optim_wrapper.update_count,
                 weights_changed=any(not torch.equal(probe.init[k], final[k]) for k in final),
                 same_on_every_rank=all(torch.equal(w[k], final[k])
                                        for _, w in gathered for k in final),
                 matches_unsharded=all(torch.allclose(expected[k], final[k], atol=1e-5)
                                       for k in final),
                 loss_before=data_loss(probe.init), loss_after=data_loss(final))
    runner.close()
    Path(work_dir, f'result_rank{facts["rank"]}.json').write_text(json.dumps(facts))


if __name__ == '__main__':
    main(sys.argv[1], json.loads(sys.argv[2]))
