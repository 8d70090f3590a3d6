"""Samplers and build_dataloader."""
from __future__ import annotations

import itertools

import pytest
import torch

from conftest import CountingData, RegressionData
from scale_runner.data import DefaultSampler, InfiniteSampler, build_dataloader, get_sampler
from scale_runner.errors import ConfigError


def test_default_sampler_order_is_pure_function_of_seed_and_epoch():
    ds = RegressionData(50)
    a, b = DefaultSampler(ds, seed=7), DefaultSampler(ds, seed=7)
    orders = {}
    for epoch in (0, 1, 2):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        oa, ob = list(a), list(b)
        assert oa == ob
        assert sorted(oa) == list(range(50))
        orders[epoch] = oa
    assert orders[0] != orders[1] != orders[2]
    # global RNG state does not matter, nor does history: going back gives the same order
    torch.manual_seed(123)
    a.set_epoch(1)
    assert list(a) == orders[1]
    assert list(a) == orders[1]  # iterating twice without set_epoch repeats it
    c = DefaultSampler(ds, seed=8)
    c.set_epoch(1)
    assert list(c) != orders[1]


def test_default_sampler_without_shuffle_is_sequential():
    s = DefaultSampler(RegressionData(10), shuffle=False, seed=3)
    s.set_epoch(5)
    assert list(s) == list(range(10))
    assert len(s) == 10


def test_set_start_skips_n_samples_once():
    ds = RegressionData(20)
    s = DefaultSampler(ds, seed=1)
    s.set_epoch(3)
    full = list(s)
    s.set_start(7)
    assert list(s) == full[7:]
    assert list(s) == full  # only the next pass is shortened
    s.set_start(20)
    assert list(s) == []


def test_shuffled_order_is_torch_randperm_made_lazily_across_pieces(monkeypatch):
    """The order is ``randperm(n)`` of a generator seeded with ``seed + epoch`` (so resumes of
    checkpoints written by earlier versions see the same data), handed out piece by piece."""
    import scale_runner.data as data
    monkeypatch.setattr(data, '_PIECE', 7)  # several pieces, the last one short
    n, seed, epoch = 50, 3, 2
    s = DefaultSampler(RegressionData(n), seed=seed)
    s.set_epoch(epoch)
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    assert list(s) == expected
    s.set_start(11)
    assert list(s) == expected[11:]


def test_set_start_through_a_dataloader_never_reads_skipped_samples():
    ds = CountingData(32)
    loader = build_dataloader(dict(dataset=ds, batch_size=4,
                                   sampler=dict(type='DefaultSampler', shuffle=True)), seed=5)
    sampler = get_sampler(loader)
    assert isinstance(sampler, DefaultSampler) and sampler.seed == 5
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_start(12)
    batches = list(loader)
    assert len(batches) == 5
    assert ds.reads == full[12:]


def test_infinite_sampler_wraps_epochs():
    ds = RegressionData(6)
    s = InfiniteSampler(ds, seed=4)
    ref = DefaultSampler(ds, seed=4)
    expected = []
    for epoch in range(3):
        ref.set_epoch(epoch)
        expected += list(ref)
    assert list(itertools.islice(iter(s), 18)) == expected
    # set_start beyond one pass lands in the right epoch and position
    s2 = InfiniteSampler(ds, seed=4)
    s2.set_start(8)
    assert list(itertools.islice(iter(s2), 10)) == expected[8:18]


def test_build_dataloader_defaults_and_passthrough():
    ds = RegressionData(10)
    loader = build_dataloader(dict(dataset=ds, batch_size=4))
    assert isinstance(loader, torch.utils.data.DataLoader)
    assert [len(b['x']) for b in loader] == [4, 4, 2]
    # default: not shuffled, seeded
    assert torch.equal(next(iter(loader))['x'], ds.x[:4])
    assert build_dataloader(loader) is loader


def test_build_dataloader_from_registry_dataset():
    pytest.importorskip('scale_runner.examples.toy')
    loader = build_dataloader(dict(dataset=dict(type='SpiralDataset', size=30), batch_size=8,
                                   sampler=dict(type='DefaultSampler', shuffle=True),
                                   collate_fn=dict(type='pseudo_collate')))
    batch = next(iter(loader))
    assert isinstance(batch, list) and len(batch) == 8


def test_missing_dataset_names_key_path():
    with pytest.raises(ConfigError, match=r'train_dataloader\.dataset'):
        build_dataloader(dict(batch_size=4), where='train_dataloader')


def test_unknown_sampler_type_names_key_path():
    with pytest.raises(ConfigError, match=r'train_dataloader\.sampler') as err:
        build_dataloader(dict(dataset=RegressionData(4), sampler=dict(type='DefaultSampeler')),
                         where='train_dataloader')
    assert 'DefaultSampler' in str(err.value)


def test_unknown_dataset_type_names_key_path():
    with pytest.raises(ConfigError, match=r'val_dataloader\.dataset'):
        build_dataloader(dict(dataset=dict(type='NoSuchDataset')), where='val_dataloader')


def test_bad_dataloader_kwarg_names_key_path():
    with pytest.raises(ConfigError, match=r'train_dataloader\.batch_sise'):
        build_dataloader(dict(dataset=RegressionData(4), batch_sise=2), where='train_dataloader')


def test_bad_sampler_kwarg_names_key_path():
    with pytest.raises(ConfigError, match=r'train_dataloader\.sampler\.shufle'):
        build_dataloader(dict(dataset=RegressionData(4), sampler=dict(type='DefaultSampler',
                                                                      shufle=True)),
                         where='train_dataloader')


def test_unknown_collate_fn_names_key_path():
    with pytest.raises(ConfigError, match=r'train_dataloader\.collate_fn'):
        build_dataloader(dict(dataset=RegressionData(4), collate_fn=dict(type='no_such_collate')),
                         where='train_dataloader')


def test_workers_are_seeded_reproducibly():
    class RandData(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return torch.rand(1)

    def draws():
        torch.manual_seed(0)
        loader = build_dataloader(dict(dataset=RandData(), batch_size=4, num_workers=2))
        return torch.cat([b for b in loader])

    assert torch.equal(draws(), draws())


def test_default_sampler_order_identical_across_resumes_and_ranks():
    """A resumed run (fresh sampler, other global RNG state, position restored) continues with
    exactly the order the uninterrupted run had; every rank builds that same global order and
    Accelerate's shards of it, together, are that order (padding aside)."""
    from accelerate.data_loader import prepare_data_loader
    ds = RegressionData(21)
    first = DefaultSampler(ds, shuffle=True, seed=11)
    first.set_epoch(2)
    uninterrupted = list(first)
    state = first.state_dict()
    torch.manual_seed(999)  # the resumed process's global RNG has nothing to do with the order
    resumed = DefaultSampler(ds, shuffle=True, seed=11)
    resumed.load_state_dict(state)
    resumed.set_start(9)
    assert list(resumed) == uninterrupted[9:]
    with pytest.raises(ValueError, match='seed'):
        DefaultSampler(ds, seed=12).load_state_dict(state)
    # ranks: each rank's loader (built independently, as each process does) reads its shard
    shards = []
    for rank in range(2):
        loader = build_dataloader(dict(dataset=CountingData(21), batch_size=4,
                                       sampler=dict(type='DefaultSampler', shuffle=True, seed=11)))
        prepared = prepare_data_loader(loader, num_processes=2, process_index=rank, put_on_device=False)
        get_sampler(prepared).set_epoch(2)
        assert list(get_sampler(prepared)) == uninterrupted
        prepared.set_epoch(2)
        list(prepared)
        shards.append(prepared.dataset.reads)
    # round-robin batches of 4: rank 0 reads batches 0, 2, 4; rank 1 batches 1, 3, 5 (+ padding)
    batches = [uninterrupted[i:i + 4] for i in range(0, 21, 4)]
    assert shards[0][:12] == batches[0] + batches[2] + batches[4]
    assert shards[1][:8] == batches[1] + batches[3]
    assert sorted(set(shards[0]) | set(shards[1])) == list(range(21))


def test_mmengine_round_up_false_points_to_even_batches():
    assert len(DefaultSampler(RegressionData(4), round_up=True)) == 4
    with pytest.raises(ConfigError, match='even_batches=False'):
        build_dataloader(dict(dataset=RegressionData(4), sampler=dict(type='DefaultSampler',
                                                                      round_up=False)))
