"""tests/test_evaluation.py's evaluation job: ``accelerate launch``es it on 2 processes and
imports it for the 1-process reference. argv: the work directory, the predictions file."""

import json
import os
import sys

import torch
from torch import nn

from scale_runner import METRICS, BaseMetric, BaseModel, Runner
from scale_runner.data import get_sampler

N, BATCH, CLASSES = 101, 8, 5


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(-3, 4, (N, 6), generator=g).float()
        self.y = torch.randint(0, CLASSES, (N,), generator=g)

    def __len__(self):
        return N

    def __getitem__(self, i):
        return {'inputs': self.x[i], 'labels': self.y[i], 'index': torch.tensor(i)}


class Classifier(BaseModel):
    """Integer weights and inputs: logits are exact whatever the batch composition."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, CLASSES, bias=False)
        with torch.no_grad():
            g = torch.Generator().manual_seed(1)
            self.fc.weight.copy_(torch.randint(-2, 3, (CLASSES, 6), generator=g).float())

    def forward(self, inputs, labels=None, index=None, mode='tensor'):
        logits = self.fc(inputs)
        if mode == 'predict':
            loss = nn.functional.cross_entropy(logits, labels, reduction='none')
            return {'logits': logits, 'labels': labels, 'loss': loss, 'index': index}
        return logits


class SampleStats(BaseMetric):
    """One result per sample: the index the batch says it has, and whether top-1 is right."""

    def process(self, data_batch, data_samples):
        hits = data_samples['logits'].argmax(-1) == data_batch['labels']
        for i, h in zip(data_batch['index'].tolist(), hits.tolist()):
            self.results.append((i, h))

    def compute_metrics(self, results):
        ids = [i for i, _ in results]
        return {'count': len(results), 'unique': len(set(ids)), 'hits': sum(h for _, h in results),
                'matches_index': ids == self.result_indices}


class BatchCount(BaseMetric):
    """Per-batch results: one per batch."""

    def process(self, data_batch, data_samples):
        self.results.append(len(data_batch['labels']))

    def compute_metrics(self, results):
        return {'batches': len(results)}


def build(work_dir, out_file):
    for cls in (SampleStats, BatchCount):
        METRICS.register_module(module=cls, force=True)
    return Runner(
        model=Classifier(), work_dir=work_dir, log_level='WARNING', default_hooks={'checkpoint': None},
        val_dataloader=dict(dataset=Data(), batch_size=BATCH,
                            sampler=dict(type='DefaultSampler', shuffle=True, seed=3)),
        val_cfg=dict(),
        val_evaluator=[dict(type='SampleStats'), dict(type='BatchCount'),
                       dict(type='Accuracy', topk=(1, 3)),
                       dict(type='torchmetrics.classification.MulticlassAccuracy',
                            num_classes=CLASSES, average='macro', name='macro_acc'),
                       dict(type='torchmetrics.classification.MulticlassAUROC',
                            num_classes=CLASSES, thresholds=None, name='auroc'),
                       dict(type='DumpPredictions', out_file=out_file, keys=['labels'])])


def main(work_dir, out_file):
    runner = build(work_dir, out_file)
    metrics = runner.val()
    acc = runner.accelerator
    loader = runner.val_loop.dataloader
    order = list(get_sampler(loader))  # the order of the pass just run (epoch 0)
    rows = sum(len(b['labels']) for b in loader)
    record = dict(metrics=metrics, rows=rows, processes=acc.num_processes, order=order)
    with open(os.path.join(work_dir, f'rank{acc.process_index}.json'), 'w') as f:
        json.dump(record, f)
    runner.close()


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
