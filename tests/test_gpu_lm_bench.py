"""bench/gpu_lm.py (issue 22, part 3) runs on a CPU with a tiny model: the script the GPU check
runs is exercised here (its figures are only meaningful on a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / 'bench' / 'gpu_lm.py'


def bench(tmp_path, variants, extra=()):
    out = tmp_path / 'rows.json'
    proc = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--tiny', '--reps', '1',
                           '--variants', variants, '--peak-flops', '1e10', '--json', str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {r['variant']: r for r in json.loads(out.read_text())}, proc.stdout


def test_loop_and_runner_on_a_cpu(tmp_path):
    rows, table = bench(tmp_path, 'loop,runner')
    loop, runner = rows['loop'], rows['runner']
    for r in (loop, runner):
        assert r['tokens_per_s'] > 0 and 0 < r['mfu'] < 1 and r['peak_mib'] is None
    assert runner['vs'] == 'loop' and runner['tokens_ratio'] == runner['tokens_per_s'] / loop['tokens_per_s']
    assert runner['loss'] == loop['loss']  # same seed, weights and batches: the same training
    assert 'runner final loss == loop final loss bit for bit: yes' in table


@pytest.mark.slow
def test_fsdp_and_compiled_variants_on_a_cpu(tmp_path):
    rows, _ = bench(tmp_path, 'loop,runner+fsdp,loop+compile,runner+compile')
    # one CPU process has nothing to shard (the GPU run checks that the model is sharded)
    assert rows['runner+fsdp']['vs'] == 'loop' and rows['runner+fsdp']['loss'] == rows['loop']['loss']
    assert rows['runner+compile']['vs'] == 'loop+compile'
    assert all(not r.get('failed') for r in rows.values())
