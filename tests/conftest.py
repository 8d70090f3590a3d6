"""Shared test fixtures: a fresh Accelerate state per test, and small in-memory parts."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault('WANDB_MODE', 'offline')
os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)

# tests/parts: the modules, job scripts and configs of the tests (see its README).
PARTS_DIR = Path(__file__).resolve().parent / 'parts'
if str(PARTS_DIR) not in sys.path:
    sys.path.insert(0, str(PARTS_DIR))


def pythonpath(*dirs) -> str:
    """A subprocess's PYTHONPATH: ``dirs``, tests/parts, then this process's PYTHONPATH."""
    return os.pathsep.join([*(str(d) for d in dirs), str(PARTS_DIR),
                            os.environ.get('PYTHONPATH', '')])


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide state; every test starts from none."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


class RegressionData(torch.utils.data.Dataset):
    """``y = x @ w + noise`` with a fixed seed; samples are ``dict(x=..., y=...)``."""

    def __init__(self, size: int = 64, dim: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(size, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.01 * torch.randn(size, 1, generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {'x': self.x[i], 'y': self.y[i]}


class CountingData(RegressionData):
    """RegressionData that records which samples were read."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def __getitem__(self, i):
        self.reads.append(int(i))
        return super().__getitem__(i)


from sr_models import PlainRegressor  # noqa: E402  (tests/parts: subprocesses import it too)


@pytest.fixture
def tiny_parts():
    """Keyword arguments for a small Runner (train + val) on in-memory regression data."""
    import importlib
    importlib.import_module('sr_metrics')  # tests/parts/sr_metrics.py: registers 'MSE'

    def make(work_dir, **over):
        parts = dict(
            model=PlainRegressor(),
            work_dir=str(work_dir),
            train_dataloader=dict(dataset=RegressionData(64), batch_size=8,
                                  sampler=dict(type='DefaultSampler', shuffle=True)),
            val_dataloader=dict(dataset=RegressionData(20, seed=1), batch_size=8),
            val_evaluator=dict(type='MSE'),
            val_cfg=dict(),
            train_cfg=dict(by_epoch=True, max_epochs=2),
            optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
            randomness=dict(seed=0),
            log_level='WARNING',
        )
        parts.update(over)
        return parts
    return make


def run_cli(args, cwd=None, env=None, timeout=300):
    """Run ``python -m scale_runner ARGS`` in a subprocess; return the CompletedProcess."""
    import subprocess
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, '-m', 'scale_runner', *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
