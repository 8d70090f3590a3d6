"""Streamed datasets (issue 20): ``HFDataset(..., streaming=True)`` over real JSON-lines shards,
packing, shuffle buffers, ranks and workers, and exact resume after SIGKILL (final weights
compared bit for bit with an uninterrupted run).

One-process runs are forked from the test process; two-process runs go through
``accelerate launch`` on gloo. The kill hooks are tests/parts/sr_resume_parts.py's
(``SR_KILL='iter:n'`` kills before iteration n's checkpoint, ``'after_save:n'`` right after).
The full matrix (1 and 2 processes x 0 and 2 workers x kill points) is marked ``slow``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import run_forked  # a forked training child, as the exact-resume tests use
from conftest import pythonpath
from stream_parts import write_shards

MAX_ITERS = 30


def make_cfg(files: list[str], workers: int = 0, nproc: int = 1, **over) -> dict:
    cfg = dict(
        custom_imports=dict(imports=['stream_parts', 'sr_resume_parts']),
        model=dict(type='TinyLM'),
        train_dataloader=dict(
            dataset=dict(type='HFDataset', path='json', data_files=files, streaming=True,
                         rename_columns={'ids': 'input_ids'}, pack=dict(block_size=12, eos_id=0),
                         shuffle=dict(buffer_size=16)),
            batch_size=4 // nproc, num_workers=workers, snapshot_every_n_steps=5),
        train_cfg=dict(by_epoch=False, max_iters=MAX_ITERS, val_interval=10**6),
        # windows of 2: the odd checkpoints (7, 21) carry partial gradients too
        optim_wrapper=dict(optimizer=dict(type='AdamW', lr=0.01), accumulative_counts=2),
        default_hooks=dict(checkpoint=dict(by_epoch=False, interval=7), logger=None),
        custom_hooks=[dict(type='KillHook'), dict(type='LateKillHook')],
        randomness=dict(seed=7),
        log_level='WARNING',
    )
    cfg.update(over)
    return cfg


@pytest.fixture(scope='session')
def shards(tmp_path_factory) -> list[str]:
    # 4 shards x 10 documents (~18 blocks each): a pass is ~18 iterations on one process, so
    # every run crosses pass boundaries (and more of them on two processes)
    import accelerate  # noqa: F401  (forked children inherit the imports)
    import sr_resume_parts  # noqa: F401  (the kill hooks; a dict config imports nothing itself)
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    return write_shards(tmp_path_factory.mktemp('shards'), shards=4, docs=10)


def _env(kill: str | None = None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', ACCELERATE_USE_CPU='1', PYTHONPATH=pythonpath())
    for var in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SR_KILL'):
        env.pop(var, None)
    if kill:
        env['SR_KILL'] = kill
    return env


def launch(cfg: dict, work: Path, nproc: int, kill: str | None = None,
           resume: bool | Path = False) -> subprocess.Popen:
    """``accelerate launch --multi_gpu`` (gloo on CPU) of the CLI, started."""
    cfg_file = work.parent / f'{work.name}.json'
    cfg_file.write_text(json.dumps(cfg))
    args = ['train', str(cfg_file), '--work-dir', str(work)]
    args += ['--resume', str(resume)] if isinstance(resume, Path) else ['--resume'] if resume else []
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes',
           str(nproc), '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', '0', '-m', 'scale_runner', *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(kill), cwd=work.parent)


def run_launch(cfg: dict, work: Path, nproc: int, kill: str | None = None,
               resume: bool | Path = False) -> subprocess.CompletedProcess:
    proc = launch(cfg, work, nproc, kill, resume)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def final_model(work: Path) -> bytes:
    ckpt = work / 'checkpoints' / f'iter_{MAX_ITERS}'
    assert (ckpt / 'manifest.json').is_file(), f'{ckpt} was not completely written'
    return (ckpt / 'model.safetensors').read_bytes()


def train(cfg: dict, work: Path, nproc: int, kill: str | None = None, resume: bool = False) -> int:
    if nproc == 1:
        return run_forked(cfg, work, kill, resume)
    proc = run_launch(cfg, work, nproc, kill, resume)
    if kill is None:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.returncode


_BASELINES: dict = {}


def baseline(tmp_path_factory, shards, nproc: int, workers: int) -> bytes:
    key = (nproc, workers)
    if key not in _BASELINES:
        work = tmp_path_factory.mktemp(f'stream_base_{nproc}_{workers}') / 'work'
        assert train(make_cfg(shards, workers, nproc), work, nproc) == 0
        _BASELINES[key] = final_model(work)
    return _BASELINES[key]


def kill_and_resume(tmp_path, shards, nproc: int, workers: int, kills: list[str]) -> Path:
    cfg, work = make_cfg(shards, workers, nproc), tmp_path / 'work'
    for i, kill in enumerate(kills):
        code = train(cfg, work, nproc, kill=kill, resume=i > 0)
        assert code != 0, f'{kill}: the run was not killed'
        if nproc == 1:
            assert code == -signal.SIGKILL, f'{kill}: exit {code}'
        assert not (work / 'checkpoints' / f'iter_{MAX_ITERS}').exists()
    assert train(cfg, work, nproc, resume=True) == 0
    return work


# ---- the stages and the loader ------------------------------------------------------------
def test_pack_tokens_carries_the_remainder_across_documents():
    from scale_runner.registry import FUNCTIONS
    pack = FUNCTIONS.get('pack_tokens')(block_size=4, eos_id=0)
    docs = [{'input_ids': [1, 2, 3]}, {'input_ids': [4, 5, 6, 7, 8, 9]}, {'input_ids': [10]}]
    blocks = [b['input_ids'].tolist() for b in pack(iter(docs))]
    assert blocks == [[1, 2, 3, 0], [4, 5, 6, 7], [8, 9, 0, 10]]
    assert pack.state_dict()['ids'].tolist() == [0]  # the remainder waits for the next document
    again = FUNCTIONS.get('pack_tokens')(block_size=4, eos_id=0)
    again.load_state_dict(pack.state_dict())
    assert [b['labels'].tolist() for b in again(iter([{'input_ids': [11, 12, 13]}]))] == [[0, 11, 12, 13]]


def _loader(shards, workers, rank=0, world=1, **dataset):
    from scale_runner.hf_datasets import HFDataset
    from scale_runner.streaming import build_stream_loader
    ds = HFDataset(path='json', data_files=shards, streaming=True, **dataset)
    return build_stream_loader(ds, dict(batch_size=4, num_workers=workers, snapshot_every_n_steps=5),
                               seed=3, rank=rank, where='train_dataloader') if world == 1 else ds


def _roundtrip(state):
    """What a checkpoint does to the state: tensors to safetensors' side, the rest to JSON."""
    from scale_runner.checkpoint.format import join_tensors, split_tensors
    tensors: dict = {}
    doc = json.loads(json.dumps(split_tensors(state, tensors)))
    return join_tensors(doc, tensors)


@pytest.mark.parametrize('workers', [0, 2])
def test_loader_resumes_exactly_twice_in_a_row(shards, workers):
    opts = dict(rename_columns={'ids': 'input_ids'}, pack=dict(block_size=12, eos_id=0),
                shuffle=dict(buffer_size=16))
    it = iter(_loader(shards, workers, **opts))
    expected = [next(it)['input_ids'] for _ in range(60)]  # > 3 passes
    first = _loader(shards, workers, **opts)
    it = iter(first)
    for _ in range(13):  # not a multiple of the snapshot interval: the loader replays 3 batches
        next(it)
    state = _roundtrip(first.state_dict())
    second = _loader(shards, workers, **opts)
    second.load_state_dict(state)
    it = iter(second)
    got = [next(it)['input_ids'] for _ in range(20)]
    third = _loader(shards, workers, **opts)
    third.load_state_dict(_roundtrip(second.state_dict()))
    it = iter(third)
    got += [next(it)['input_ids'] for _ in range(27)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected[13:], strict=True))


def test_ranks_and_workers_read_disjoint_shards_covering_the_stream(shards):
    """Each of 2 ranks x 2 workers reads its own shard; one pass of all of them is the data."""
    from scale_runner.hf_datasets import HFDataset
    everything = [r['ids'] for f in shards for r in map(json.loads, Path(f).read_text().splitlines())]
    seen = []
    for rank in (0, 1):
        ds = HFDataset(path='json', data_files=shards, streaming=True, format=None)
        ds.setup(rank, 2, 2, seed=0, cycle=False)
        from torch.utils.data import DataLoader
        seen += [r['ids'] for r in DataLoader(ds, batch_size=None, num_workers=2)]
    assert sorted(map(tuple, seen)) == sorted(map(tuple, everything))


def test_shuffle_buffer_uses_the_run_seed_and_reshuffles_each_pass(shards):
    from scale_runner.hf_datasets import HFDataset

    def order(seed, n=80):  # 40 documents a pass: two passes
        ds = HFDataset(path='json', data_files=shards, streaming=True, format=None,
                       shuffle=dict(buffer_size=8))
        ds.setup(0, 1, 0, seed=seed, cycle=True)
        it = iter(ds)
        return [tuple(next(it)['ids']) for _ in range(n)]
    plain = [tuple(r['ids']) for f in shards for r in map(json.loads, Path(f).read_text().splitlines())]
    first = order(3)
    assert first == order(3) and first != order(4)     # a pure function of the seed
    assert first[:40] != plain and sorted(first[:40]) != sorted(first[40:]) or first[:40] != first[40:]
    assert sorted(first[:36]) != sorted(plain[:36])    # documents moved across the buffer


def _tokens(example: dict) -> dict:
    return {'input_ids': [int(t) for t in str(example['line']).split()]}


@pytest.mark.parametrize('fmt', ['text', 'csv', 'parquet'])
def test_text_csv_and_parquet_shards_stream_and_resume(tmp_path, fmt):
    rows = [' '.join(str(1 + (7 * i + j) % 40) for j in range(3 + i % 9)) for i in range(60)]
    files = []
    for s in range(2):
        part = rows[s::2]
        path = tmp_path / f'part-{s}.{ {"text": "txt"}.get(fmt, fmt)}'
        if fmt == 'text':
            path.write_text('\n'.join(part) + '\n')
        elif fmt == 'csv':
            path.write_text('line\n' + '\n'.join(part) + '\n')
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({'line': part}), path)
        files.append(str(path))
    opts = dict(map=_tokens, map_kwargs=dict(remove_columns=['line'] if fmt != 'text' else ['text']),
                pack=dict(block_size=8, eos_id=0), shuffle=dict(buffer_size=6))
    if fmt == 'text':
        opts['rename_columns'] = None
        opts['map'] = lambda ex: _tokens({'line': ex['text']})
    path = 'text' if fmt == 'text' else fmt
    from scale_runner.hf_datasets import HFDataset
    from scale_runner.streaming import build_stream_loader

    def loader():
        ds = HFDataset(path=path, data_files=files, streaming=True, **opts)
        return build_stream_loader(ds, dict(batch_size=2), seed=1, rank=0, where='train_dataloader')
    it = iter(loader())
    expected = [next(it)['input_ids'] for _ in range(40)]  # ~3 passes
    first = loader()
    it = iter(first)
    for _ in range(17):
        next(it)
    second = loader()
    second.load_state_dict(_roundtrip(first.state_dict()))
    it = iter(second)
    assert all(torch.equal(next(it)['input_ids'], e) for e in expected[17:])


def test_another_number_of_workers_is_refused(shards):
    from scale_runner.checkpoint.format import CheckpointError
    first = _loader(shards, 0, rename_columns={'ids': 'input_ids'}, pack=dict(block_size=12))
    next(iter(first))
    with pytest.raises(CheckpointError, match=r'read with 0 train_dataloader\.num_workers, this '
                                              r'run has 2.*resume with the same setup'):
        _loader(shards, 2, rename_columns={'ids': 'input_ids'}).load_state_dict(first.state_dict())


# ---- exact resume after SIGKILL ------------------------------------------------------------
@pytest.mark.parametrize('workers, kills', [
    (0, ['iter:11']),               # resumes from iter_7 (inside an accumulation window)
    (2, ['iter:11', 'iter:20']),    # workers (loader replays since the last snapshot), twice
])
def test_sigkill_and_resume_is_bit_identical(tmp_path, tmp_path_factory, shards, workers, kills):
    expected = baseline(tmp_path_factory, shards, 1, workers)
    work = kill_and_resume(tmp_path, shards, 1, workers, kills)
    assert final_model(work) == expected
    from scale_runner.checkpoint import read_checkpoint
    data = read_checkpoint(work / 'checkpoints' / f'iter_{MAX_ITERS}')['rank']['data']
    assert data['reader'] == {'rank': 0, 'world_size': 1, 'num_workers': workers}


def test_two_processes_resume_bit_identical_and_another_world_size_is_refused(tmp_path, shards):
    """Two launches (time): the uninterrupted run, then a run resumed from its iter_14 (the
    SIGKILL variants on two processes are in the slow matrix)."""
    cfg, base, work = make_cfg(shards, 0, 2), tmp_path / 'base', tmp_path / 'work'
    cfg['default_hooks']['checkpoint']['max_keep_ckpts'] = -1
    assert train(cfg, base, 2) == 0
    proc = run_launch(cfg, work, 2, resume=base / 'checkpoints' / 'iter_14')
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert final_model(work) == final_model(base)
    assert (work / 'checkpoints' / f'iter_{MAX_ITERS}' / 'data_1.json').is_file()  # rank 1's own
    from scale_runner import Config, Runner
    from scale_runner.checkpoint.format import CheckpointError
    cfg = make_cfg(shards, 0, 1, train_cfg=dict(by_epoch=False, max_iters=40, val_interval=10**6))
    runner = Runner.from_cfg(Config({**cfg, 'work_dir': str(tmp_path / 'one'),
                                     'resume': str(base / 'checkpoints' / 'iter_14')}))
    with pytest.raises(CheckpointError, match=r'2 -> 1 processes.*streamed.*without repeating or '
                                              r'skipping data'):
        runner.train()
    runner.close()


# ---- bad input: clear errors before training ------------------------------------------------
def _runner(tmp_path, shards, **over):
    from scale_runner import Config, Runner
    return Runner.from_cfg(Config({**make_cfg(shards, **over), 'work_dir': str(tmp_path)}))


def test_epoch_loop_with_a_stream_is_refused(tmp_path, shards):
    from scale_runner.errors import ConfigError
    runner = _runner(tmp_path, shards, train_cfg=dict(by_epoch=True, max_epochs=2))
    with pytest.raises(ConfigError, match=r'train_cfg: an epoch-based loop needs the length.*'
                                          r'streaming=True.*by_epoch=False, max_iters'):
        runner.train()


def test_sampler_on_a_stream_is_refused(tmp_path, shards):
    from scale_runner.errors import ConfigError
    cfg = make_cfg(shards)
    cfg['train_dataloader']['sampler'] = dict(type='DefaultSampler', shuffle=True)
    from scale_runner import Config, Runner
    runner = Runner.from_cfg(Config({**cfg, 'work_dir': str(tmp_path)}))
    with pytest.raises(ConfigError, match=r'train_dataloader\.sampler: the dataset is iterable.*'
                                          r'train_dataloader\.dataset\.shuffle=dict\(buffer_size'):
        runner.train()


def test_shards_that_do_not_divide_across_readers_are_refused(tmp_path, shards):
    from scale_runner.errors import ConfigError
    runner = _runner(tmp_path, shards[:3], workers=2)
    with pytest.raises(ConfigError, match=r'train_dataloader\.dataset\.data_files: the stream has 3 '
                                          r'shard.*1 process\(es\) x 2 reader.*multiple of 2 files'):
        runner.train()


def test_stream_options_on_a_map_style_dataset_are_refused(shards):
    from scale_runner.errors import ConfigError
    from scale_runner.hf_datasets import HFDataset
    with pytest.raises(ConfigError, match=r'dataset\.shuffle .* is for streamed datasets'):
        HFDataset(path='json', data_files=shards, shuffle=dict(buffer_size=4))


# ---- the full matrix ----------------------------------------------------------------------
MATRIX = [(nproc, workers, kills) for nproc in (1, 2) for workers in (0, 2)
          for kills in (['iter:16'], ['after_save:7'], ['iter:11', 'iter:20'], ['iter:23'])]


@pytest.mark.slow
@pytest.mark.parametrize('nproc, workers, kills', MATRIX)
def test_stream_resume_matrix(tmp_path, tmp_path_factory, shards, nproc, workers, kills):
    expected = baseline(tmp_path_factory, shards, nproc, workers)
    assert final_model(kill_and_resume(tmp_path, shards, nproc, workers, kills)) == expected


def test_char_lm_stream_config_trains_a_few_iterations(tmp_path):
    import sysconfig

    from scale_runner.config import Config
    from scale_runner.registry import RUNNERS
    stdlib = sysconfig.get_paths()['stdlib']
    cfg = Config.fromfile(Path(__file__).resolve().parent.parent / 'configs' / 'char_lm_stream.py')
    cfg.merge_from_dict({
        'work_dir': str(tmp_path / 'work'), 'train_cfg.max_iters': 4, 'train_cfg.val_interval': 4,
        'train_dataloader.dataset.out_dir': str(tmp_path / 'data'),
        'train_dataloader.dataset.pattern': 'a[b-s]*.py', 'train_dataloader.dataset.shards': 2,
        'train_dataloader.dataset.shuffle.buffer_size': 64,
        'val_dataloader.dataset.data_files': f'{stdlib}/bisect.py',
        'custom_hooks.0.max_new_tokens': 8, 'default_hooks.logger.interval': 2})
    runner = RUNNERS.build(cfg)
    try:
        metrics = runner.train()
    finally:
        runner.close()
    assert runner.iter == 4 and 1.0 < metrics['val_loss'] < 6.0
    assert sorted(p.name for p in (tmp_path / 'data').iterdir()) == [
        'stdlib-00-of-02.jsonl', 'stdlib-01-of-02.jsonl']
