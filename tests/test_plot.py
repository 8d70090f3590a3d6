"""``scale-runner plot``: scalars.jsonl curves as a PNG, several work dirs on one figure."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest


def _write_run(work_dir: Path, run: str, records: list[dict]) -> None:
    (work_dir / run).mkdir(parents=True)
    (work_dir / run / 'scalars.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


@pytest.fixture
def two_work_dirs(tmp_path):
    a, b = tmp_path / 'run_a', tmp_path / 'run_b'
    # run_a: trained, then resumed in a second run dir (steps continue)
    _write_run(a, '20240101_000000', [{'step': s, 'epoch': 0, 'iter': s, 'loss': 1.0 / s, 'lr': 0.1}
                                      for s in (2, 4)] + [{'step': 4, 'epoch': 1, 'iter': 4, 'val/accuracy': 0.5}])
    _write_run(a, '20240101_000100', [{'step': s, 'epoch': 1, 'iter': s, 'loss': 1.0 / s, 'lr': 0.05}
                                      for s in (6, 8)] + [{'step': 8, 'epoch': 2, 'iter': 8, 'val/accuracy': 0.7}])
    import os
    os.utime(a / '20240101_000000' / 'scalars.jsonl', (1, 1))  # older than the resumed run
    _write_run(b, '20240102_000000', [{'step': s, 'epoch': 0, 'iter': s, 'loss': 2.0 / s, 'lr': 0.2}
                                      for s in (2, 4, 6, 8)] + [{'step': 8, 'epoch': 2, 'iter': 8, 'val/accuracy': 0.6}])
    return a, b


def test_figure_has_one_panel_per_key_and_one_line_per_run(two_work_dirs):
    from scale_runner.plot import plot_runs
    a, b = two_work_dirs
    fig = plot_runs([a, b], keys=['loss', 'lr', 'val/accuracy'], size=(900, 300))
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ['loss', 'lr', 'val/accuracy']
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ['run_a', 'run_b']
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ['run_a', 'run_b']
    loss_a = axes[0].get_lines()[0]
    assert list(loss_a.get_xdata()) == [2, 4, 6, 8]  # both run dirs of run_a, joined
    assert list(loss_a.get_ydata()) == pytest.approx([0.5, 0.25, 1 / 6, 0.125])
    assert list(axes[2].get_lines()[0].get_ydata()) == pytest.approx([0.5, 0.7])
    assert list(axes[1].get_lines()[1].get_ydata()) == pytest.approx([0.2] * 4)
    assert tuple(fig.get_size_inches() * fig.dpi) == pytest.approx((900, 300))


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR'
    return struct.unpack('>II', data[16:24])


def test_cli_writes_png_of_requested_size(two_work_dirs, tmp_path):
    a, b = two_work_dirs
    out = tmp_path / 'figs' / 'curves.png'
    proc = subprocess.run([sys.executable, '-m', 'scale_runner', 'plot', str(a), str(b), '--keys',
                           'loss,val/accuracy', '-o', str(out), '--size', '800x450'],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _png_size(out) == (800, 450)
    bad = subprocess.run([sys.executable, '-m', 'scale_runner', 'plot', str(a), '--keys', 'val/acuracy',
                          '-o', str(tmp_path / 'x.png')], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "'val/accuracy'" in bad.stderr and 'Traceback' not in bad.stderr
    assert not (tmp_path / 'x.png').exists()
