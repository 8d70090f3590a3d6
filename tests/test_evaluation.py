"""Evaluator, metrics and the eval loops: exact across processes (padding dropped by sample index)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import PARTS_DIR
from torch import nn

from scale_runner import BaseMetric, BaseModel, Runner
from scale_runner.errors import ConfigError
from scale_runner.evaluation import Accuracy, Evaluator, merge_tags

torchmetrics = pytest.importorskip('torchmetrics')

N, BATCH, CLASSES = 101, 8, 5

# One module (tests/parts/eval_job.py), used by the 2-process launch and imported in-process for
# the 1-process reference.
EVAL_JOB = PARTS_DIR / 'eval_job.py'


def _import_job():
    spec = importlib.util.spec_from_file_location('eval_job', EVAL_JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, EVAL_JOB


def test_two_processes_give_exactly_the_single_process_metrics(tmp_path):
    job, script = _import_job()
    one, two = tmp_path / 'one', tmp_path / 'two'
    one.mkdir(), two.mkdir()
    env = dict(os.environ, ACCELERATE_USE_CPU='1', OMP_NUM_THREADS='1')
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
        env.pop(var, None)
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', '0', str(script), str(two), str(two / 'preds.jsonl')]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the single-process reference runs here while the launch starts up
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            job.main(str(one), str(one / 'preds.jsonl'))
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, f'stdout:\n{out}\nstderr:\n{err}'
    ref = json.loads((one / 'rank0.json').read_text())
    r0, r1 = (json.loads((two / f'rank{r}.json').read_text()) for r in (0, 1))
    assert ref['processes'] == 1 and r0['processes'] == r1['processes'] == 2
    # even_batches really padded: 13 batches of 8 -> 7 per rank, 112 rows for 101 samples
    assert ref['rows'] == N and r0['rows'] == r1['rows'] == 56
    # the sampler's order is the same on every rank and in the single process
    assert r0['order'] == r1['order'] == ref['order'] and sorted(ref['order']) == list(range(N))

    m = ref['metrics']
    assert m['count'] == m['unique'] == N and m['matches_index'] is True
    for rank in (r0, r1):
        # every metric, on every rank, exactly the single-process value (not approximately)
        assert rank['metrics'] == m, (rank['metrics'], m)
    assert m['batches'] == 13  # per-batch results: the all-padding batch is dropped
    assert m['accuracy_top1'] == m['hits'] / N
    # the loss the model returns is reported as val_loss, averaged over the 101 samples
    data, model = job.Data(), job.Classifier()
    with torch.no_grad():
        logits = model.fc(data.x)
    losses = nn.functional.cross_entropy(logits, data.y, reduction='none')
    assert m['val_loss'] == pytest.approx(losses.mean().item(), rel=1e-6)
    # the torchmetrics metrics equal the metric of the dataset, and differ from the padded copy
    from torchmetrics.functional.classification import multiclass_accuracy
    exact = multiclass_accuracy(logits, data.y, num_classes=CLASSES, average='macro').item()
    assert m['macro_acc'] == pytest.approx(exact, rel=1e-6)
    # what a padded copy would count: 2 ranks x 7 batches x 8 = 112 rows, the 11 extra ones
    # taken from the start of the order (3 to fill the last batch of 5, then a batch of 8)
    padded = torch.tensor(ref['order'] + ref['order'][:11])
    assert multiclass_accuracy(logits[padded], data.y[padded], num_classes=CLASSES,
                               average='macro').item() != pytest.approx(exact, rel=1e-6)
    # predictions dumped once per sample, in the data's order, by the main process only
    for d in (one, two):
        rows = [json.loads(line) for line in (d / 'preds.jsonl').read_text().splitlines()]
        assert [r['index'] for r in rows] == ref['order']
        assert [r['labels'] for r in rows] == data.y[ref['order']].tolist()


def _shards(dataset, batch_size, processes, **sampler):
    """The batches each rank of an Accelerate-prepared loader reads (no process group needed)."""
    from accelerate.data_loader import prepare_data_loader
    from scale_runner.data import build_dataloader
    return [prepare_data_loader(build_dataloader(dict(dataset=dataset, batch_size=batch_size,
                                                      sampler=dict(type='DefaultSampler', **sampler))),
                                num_processes=processes, process_index=r, put_on_device=False)
            for r in range(processes)]


class IndexData(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {'index': torch.tensor(i), 'labels': torch.tensor(i % 3)}


class Indices(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.extend(data_batch['index'].tolist())

    def compute_metrics(self, results):
        return {}


@pytest.mark.parametrize('n,batch,processes', [(101, 8, 2), (10, 4, 3), (3, 4, 2), (64, 8, 2)])
def test_merge_keeps_each_sample_once_in_sampler_order(n, batch, processes):
    """Each rank's Evaluator tags results through track(); merging drops exactly the padding."""
    tags = []
    for loader in _shards(IndexData(n), batch, processes, shuffle=True, seed=1):
        ev = Evaluator([Indices()])
        for data_batch in ev.track(loader):
            assert ev.batch_indices == data_batch['index'].tolist()
            ev.process({}, data_batch)
        tags.append(ev.metrics[0]._tags)
    from scale_runner.data import DefaultSampler
    order = list(DefaultSampler(IndexData(n), shuffle=True, seed=1))
    assert [idx for _, _, idx in merge_tags(tags)] == order


def test_per_batch_results_drop_all_padding_batches_and_warn_on_mixed():
    tags = []
    for loader in _shards(IndexData(101), 8, 2, shuffle=False):
        ev = Evaluator([BaseMetricPerBatch()])
        for data_batch in ev.track(loader):
            ev.process({}, data_batch)
        tags.append(ev.metrics[0]._tags)
    with pytest.warns(UserWarning, match='3 padding duplicate'):
        keep = merge_tags(tags)
    assert len(keep) == 13  # 14 batches were run, one was all padding


class BaseMetricPerBatch(BaseMetric):
    def process(self, data_batch, data_samples):
        self.results.append(len(data_batch['index']))

    def compute_metrics(self, results):
        return {'n': sum(results)}


class Seen(Indices):
    def compute_metrics(self, results):
        return {'seen': list(results)}


def test_untracked_results_fall_back_to_size():
    m = Seen()
    m.process({'index': torch.arange(5)}, None)  # called directly: no indices known
    assert m.evaluate(size=3) == {'seen': [0, 1, 2]}


# ---- torchmetrics -------------------------------------------------------------------------------
def test_torchmetrics_metric_from_config_matches_direct_computation():
    from torchmetrics.functional.classification import multiclass_accuracy
    ev = Evaluator([dict(type='torchmetrics.classification.MulticlassAccuracy', num_classes=4,
                         average='macro', pred_key='scores', label_key='y'),
                    dict(type='torchmetrics.classification.MulticlassF1Score', num_classes=4,
                         prefix='tm')])
    g = torch.Generator().manual_seed(0)
    all_scores, all_labels = torch.randn(30, 4, generator=g), torch.randint(0, 4, (30,), generator=g)
    for s in range(0, 30, 7):
        scores, labels = all_scores[s:s + 7], all_labels[s:s + 7]
        ev.process({'scores': scores, 'logits': scores}, {'y': labels, 'labels': labels})
    out = ev.evaluate(30)
    assert set(out) == {'multiclass_accuracy', 'tm/multiclass_f1_score'}
    assert out['multiclass_accuracy'] == pytest.approx(
        multiclass_accuracy(all_scores, all_labels, num_classes=4, average='macro').item())
    # reset: a second evaluation starts from nothing
    ev.process({'scores': all_scores[:2], 'logits': all_scores[:2]},
               {'y': all_labels[:2], 'labels': all_labels[:2]})
    assert ev.evaluate()['multiclass_accuracy'] == pytest.approx(
        multiclass_accuracy(all_scores[:2], all_labels[:2], num_classes=4, average='macro').item())


def test_duplicate_metric_names_across_metrics_are_an_error():
    ev = Evaluator([dict(type='Accuracy'),
                    dict(type='torchmetrics.classification.MulticlassAccuracy', num_classes=2,
                         name='accuracy')])
    ev.process({'logits': torch.tensor([[1.0, 0.0]])}, {'labels': torch.tensor([0])})
    with pytest.raises(ConfigError, match=r"\['accuracy'\].*prefix"):
        ev.evaluate()


def test_unknown_metric_type_names_key_path():
    with pytest.raises(ConfigError, match=r'val_evaluator\.metrics\[1\]\.type'):
        from scale_runner.evaluation import build_evaluator
        build_evaluator(dict(metrics=[dict(type='Accuracy'), dict(type='Acuracy')]), 'val_evaluator')


# ---- built-in metrics ----------------------------------------------------------------------------
def test_accuracy_topk_and_class_predictions_and_tuple_batches():
    acc = Accuracy(topk=(1, 2), label_key=1)
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.15, 0.05], [0.2, 0.3, 0.5]])
    acc.process((torch.zeros(3, 2), torch.tensor([1, 1, 0])), scores)
    assert acc.evaluate() == {'accuracy_top1': 1 / 3, 'accuracy_top2': 2 / 3}
    preds = Accuracy(pred_key='pred')
    preds.process({'labels': torch.tensor([2, 0])}, {'pred': torch.tensor([2, 1])})
    assert preds.evaluate() == {'accuracy': 0.5}
    with pytest.raises(KeyError, match="pred_key='logits'"):
        Accuracy().process({'labels': torch.tensor([0])}, {'pred': torch.tensor([0])})


def test_average_loss_and_perplexity():
    from scale_runner.evaluation import AverageLoss, Perplexity
    avg, ppl = AverageLoss(), Perplexity(weight_key='tokens')
    # per-sample losses, then a scalar batch loss (counts once per sample of its batch)
    for m in (avg, ppl):
        m.process({'x': torch.zeros(2, 1), 'tokens': torch.tensor([1, 3])}, {'loss': torch.tensor([1.0, 3.0])})
        m.process({'x': torch.zeros(1, 1), 'tokens': torch.tensor([4])}, {'loss': torch.tensor(2.0)})
    assert avg.evaluate() == {'loss': pytest.approx(2.0)}
    assert ppl.evaluate() == {'perplexity': pytest.approx(torch.tensor((1 + 9 + 8) / 8).exp().item())}
    with pytest.raises(KeyError, match="no 'loss'"):
        AverageLoss().process({}, {'logits': torch.zeros(1)})


# ---- eval loops ----------------------------------------------------------------------------------
class PlainWithLoss(nn.Module):
    """A plain module: outputs carry a scalar loss when labels are given."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, inputs, labels=None):
        logits = self.fc(inputs)
        out = {'logits': logits}
        if labels is not None:
            out['loss'] = nn.functional.cross_entropy(logits, labels)
        return out


class AutocastProbe(BaseModel):
    seen: list = []

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, inputs, labels=None, mode='tensor'):
        return {'logits': self.fc(inputs), 'labels': labels}

    def val_step(self, data):
        # outside forward (which Accelerate wraps itself): only the loop's autocast reaches here
        AutocastProbe.seen.append(torch.is_autocast_enabled('cpu'))
        return super().val_step(data)


def _spiral_runner(tmp_path, model, **over):
    pytest.importorskip('scale_runner.examples.toy')
    parts = dict(model=model, work_dir=str(tmp_path), log_level='WARNING',
                 default_hooks={'checkpoint': None},
                 val_dataloader=dict(dataset=dict(type='SpiralDataset', size=20), batch_size=8),
                 val_cfg=dict(), val_evaluator=dict(type='Accuracy'),
                 test_dataloader=dict(dataset=dict(type='SpiralDataset', size=12), batch_size=8),
                 test_cfg=dict(), test_evaluator=dict(type='Accuracy'))
    parts.update(over)
    return Runner(**parts)


def test_val_loss_from_a_plain_module_and_metrics_returned(tmp_path):
    torch.manual_seed(0)
    model = PlainWithLoss()
    runner = _spiral_runner(tmp_path, model)
    metrics = runner.val()
    assert set(metrics) == {'accuracy', 'val_loss'}
    from scale_runner.examples.toy import SpiralDataset
    ds = SpiralDataset(size=20)
    with torch.no_grad():
        # a scalar batch loss counts for each sample of its batch: batches of 8, 8, 4
        losses = [nn.functional.cross_entropy(model.fc(ds.inputs[s:s + 8]), ds.labels[s:s + 8]).item()
                  for s in (0, 8, 16)]
    assert metrics['val_loss'] == pytest.approx((8 * losses[0] + 8 * losses[1] + 4 * losses[2]) / 20)
    assert set(runner.test()) == {'accuracy', 'test_loss'}
    runner.close()


def test_no_loss_reported_when_the_model_returns_none(tmp_path):
    runner = _spiral_runner(tmp_path, dict(type='MLPClassifier'))
    assert set(runner.val()) == {'accuracy'}
    runner.close()


@pytest.mark.parametrize('precision', ['bf16', 'no'])
def test_eval_runs_under_autocast_with_mixed_precision(tmp_path, precision):
    AutocastProbe.seen = []
    runner = _spiral_runner(tmp_path, AutocastProbe(),
                            accelerator=dict(cpu=True, mixed_precision=precision))
    assert 0 <= runner.val()['accuracy'] <= 1
    assert AutocastProbe.seen == [precision == 'bf16'] * 3
    runner.close()


def test_cli_test_prints_table_writes_metrics_json_and_predictions(tmp_path, capsys):
    pytest.importorskip('scale_runner.examples.toy')
    from safetensors.torch import save_file
    from scale_runner.cli import main
    from scale_runner.examples.toy import MLPClassifier
    torch.manual_seed(0)
    weights = tmp_path / 'w.safetensors'
    save_file(MLPClassifier(hidden=16).state_dict(), str(weights))
    cfg = tmp_path / 'cfg.py'
    cfg.write_text(
        "custom_imports = dict(imports=['scale_runner.examples.toy'])\n"
        "model = dict(type='MLPClassifier', hidden=16)\n"
        "test_dataloader = dict(dataset=dict(type='SpiralDataset', size=30), batch_size=8)\n"
        "test_evaluator = [dict(type='Accuracy', topk=(1, 2))]\n"
        "test_cfg = dict()\n"
        "default_hooks = dict(checkpoint=None)\n"
        "log_level = 'WARNING'\n")
    work, preds = tmp_path / 'work', tmp_path / 'out' / 'preds.jsonl'
    assert main(['test', str(cfg), '--work-dir', str(work), '--checkpoint', str(weights),
                 '--out', str(preds)]) == 0
    out = capsys.readouterr().out
    assert 'metric' in out and 'accuracy_top1' in out and 'accuracy_top2' in out
    (metrics_file,) = work.glob('*/test_metrics.json')
    metrics = json.loads(metrics_file.read_text())
    assert set(metrics) == {'accuracy_top1', 'accuracy_top2'}
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r['index'] for r in rows] == list(range(30))
    # the dumped predictions are those of the loaded weights, and give the reported accuracy
    from scale_runner.examples.toy import SpiralDataset
    ds, model = SpiralDataset(size=30), MLPClassifier(hidden=16)
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(weights)))
    with torch.no_grad():
        expected = model(ds.inputs)
    assert torch.allclose(torch.tensor([r['logits'] for r in rows]), expected, atol=1e-5)
    assert [r['labels'] for r in rows] == ds.labels.tolist()
    hits = sum(int(torch.tensor(r['logits']).argmax()) == r['labels'] for r in rows)
    assert metrics['accuracy_top1'] == pytest.approx(hits / 30)
