"""HFDataset: Hugging Face ``datasets`` from local json / csv / text / parquet files, offline."""
from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('HF_DATASETS_OFFLINE', '1')  # before `datasets` is imported
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import pytest
import torch

from scale_runner import FUNCTIONS, Runner
from scale_runner.data import build_dataloader
from scale_runner.errors import ConfigError
from scale_runner.hf_datasets import HFDataset

pytest.importorskip('datasets')


@FUNCTIONS.register_module(force=True)
def hf_test_features(example, scale=1.0):
    """A registered map function (batched=False)."""
    return {'features': [scale * example['a'], scale * example['b']]}


@FUNCTIONS.register_module(force=True)
def hf_test_length(batch):
    """A registered batched map function for text."""
    return {'length': [len(t) for t in batch['text']]}


@pytest.fixture
def files(tmp_path):
    rows = [{'a': i, 'b': 2 * i, 'label': i % 3, 'note': f'row {i}'} for i in range(10)]
    (tmp_path / 'data.jsonl').write_text('\n'.join(json.dumps(r) for r in rows))
    (tmp_path / 'data.csv').write_text('a,b,label\n' + '\n'.join(f"{r['a']},{r['b']},{r['label']}" for r in rows))
    (tmp_path / 'data.txt').write_text('\n'.join(['hello', 'a longer line', 'x']))
    return tmp_path


def _kw(tmp_path):
    return dict(cache_dir=str(tmp_path / 'hf_cache'))


def test_json_with_map_columns_and_torch_format(files):
    ds = HFDataset('json', data_files=str(files / 'data.jsonl'), split='train',
                   map=dict(type='hf_test_features', scale=0.5), columns=['features', 'label'],
                   **_kw(files))
    assert len(ds) == 10 and ds.column_names == ['features', 'label']
    item = ds[3]
    assert torch.equal(item['features'], torch.tensor([1.5, 3.0]))
    assert isinstance(item['label'], torch.Tensor) and int(item['label']) == 0
    loader = build_dataloader(dict(dataset=ds, batch_size=4))
    batch = next(iter(loader))
    assert batch['features'].shape == (4, 2) and batch['label'].tolist() == [0, 1, 2, 0]


def test_csv_from_config_through_the_registry(files):
    loader = build_dataloader(dict(
        dataset=dict(type='HFDataset', path='csv', data_files=dict(validation=str(files / 'data.csv')),
                     split='validation', rename_columns=dict(label='labels'), **_kw(files)),
        batch_size=5, sampler=dict(type='DefaultSampler', shuffle=True, seed=1)))
    batches = list(loader)
    assert [len(b['labels']) for b in batches] == [5, 5]
    assert sorted(torch.cat([b['a'] for b in batches]).tolist()) == list(range(10))
    assert set(batches[0]) == {'a', 'b', 'labels'}


def test_text_file_with_batched_map(files):
    ds = HFDataset('text', data_files=str(files / 'data.txt'), map='hf_test_length',
                   map_kwargs=dict(batched=True), **_kw(files))
    assert len(ds) == 3
    assert ds[1]['text'] == 'a longer line' and int(ds[1]['length']) == 13
    batch = build_dataloader(dict(dataset=ds, batch_size=3)).__iter__().__next__()
    assert batch['length'].tolist() == [5, 13, 1] and batch['text'] == ['hello', 'a longer line', 'x']


def test_parquet_and_load_from_disk(files):
    import datasets
    src = datasets.Dataset.from_dict({'x': [[1.0, 2.0], [3.0, 4.0]], 'y': [0, 1]})
    src.to_parquet(str(files / 'data.parquet'))
    ds = HFDataset('parquet', data_files=str(files / 'data.parquet'), **_kw(files))
    assert torch.equal(ds[1]['x'], torch.tensor([3.0, 4.0]))
    datasets.DatasetDict(train=src, test=src.select([0])).save_to_disk(str(files / 'saved'))
    saved = HFDataset(str(files / 'saved'), split='test')
    assert len(saved) == 1 and int(saved[0]['y']) == 0
    with pytest.raises(ConfigError, match=r"split='val'.*\['test', 'train'\]"):
        HFDataset(str(files / 'saved'), split='val')


def test_missing_split_names_the_available_ones(files):
    with pytest.raises(ConfigError, match=r"split='validation'.*available splits: \['train'\]"):
        HFDataset('json', data_files=str(files / 'data.jsonl'), split='validation', **_kw(files))


def test_missing_column_names_the_available_ones(files):
    with pytest.raises(ConfigError, match=r"'lable' \(did you mean 'label'\?\).*available columns: "
                                          r"\['a', 'b', 'label', 'note'\]"):
        HFDataset('json', data_files=str(files / 'data.jsonl'), columns=['a', 'lable'], **_kw(files))
    with pytest.raises(ConfigError, match='rename_columns'):
        HFDataset('json', data_files=str(files / 'data.jsonl'), rename_columns={'nope': 'x'}, **_kw(files))


def test_unknown_map_function_is_a_config_error(files):
    with pytest.raises(ConfigError, match='dataset.map'):
        HFDataset('json', data_files=str(files / 'data.jsonl'), map='no_such_fn', **_kw(files))


def test_without_datasets_the_error_gives_the_install_line(monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # what `import datasets` sees when absent
    with pytest.raises(ImportError, match=r"pip install 'scale_runner\[datasets\]'"):
        HFDataset('json', data_files='x.jsonl')


def test_runner_validates_on_an_hf_dataset(files):
    """Built inside runner.build_dataloader: main_process_first with a live Accelerate state."""
    from torch import nn

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 3)

        def forward(self, features, label):
            return {'logits': self.fc(features)}

    runner = Runner(model=Linear(), work_dir=str(files / 'work'), log_level='WARNING',
                    default_hooks={'checkpoint': None},
                    val_dataloader=dict(dataset=dict(type='HFDataset', path='json',
                                                     data_files=str(files / 'data.jsonl'),
                                                     map='hf_test_features',
                                                     columns=['features', 'label'], **_kw(files)),
                                        batch_size=4),
                    val_cfg=dict(), val_evaluator=dict(type='Accuracy', label_key='label'))
    metrics = runner.val()
    assert set(metrics) == {'accuracy'} and 0 <= metrics['accuracy'] <= 1
    runner.close()
