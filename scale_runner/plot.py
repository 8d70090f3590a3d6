"""``scale-runner plot WORK_DIR [WORK_DIR ...] --keys loss,lr,val/accuracy -o curves.png``.

Reads the ``scalars.jsonl`` files a run writes (``work_dir/<timestamp>/scalars.jsonl``; the
runs of one work dir, e.g. a run and its resumptions, are joined in time order, a later record
replacing an earlier one at the same step) and draws one panel per key, x = train iteration,
one line per work dir, so several runs compare on one figure. matplotlib (Agg backend) is
imported only here: ``pip install 'scale_runner[plot]'``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .errors import ConfigError

META_KEYS = ('step', 'epoch', 'iter')


def scalar_files(path: str | Path) -> list[Path]:
    """The scalars files of a work dir, a run dir, or a scalars file itself, oldest first."""
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / 'scalars.jsonl').is_file():
        return [path / 'scalars.jsonl']
    files = sorted(path.glob('*/scalars.jsonl'), key=lambda p: (p.stat().st_mtime, p.parent.name))
    if not files:
        raise ConfigError(f'no scalars.jsonl under {path} (expected {path}/<timestamp>/scalars.jsonl '
                          f'written by a training run)')
    return files


def load_series(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{key: [(step, value), ...]}`` sorted by step, from every scalars file of ``path``."""
    series: dict[str, dict[int, float]] = {}
    for file in scalar_files(path):
        for line in file.read_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            step = record.get('step')
            for key, value in record.items():
                if key in META_KEYS or not isinstance(value, (int, float)) or step is None:
                    continue
                series.setdefault(key, {})[int(step)] = float(value)
    return {k: sorted(v.items()) for k, v in series.items()}


def plot_runs(work_dirs: list, keys: list[str] | None = None, size: tuple[int, int] | None = None,
              dpi: int = 100, labels: list[str] | None = None):
    """A matplotlib Figure: one panel per key, one line per work dir (label = its name)."""
    import matplotlib
    matplotlib.use('Agg', force=True)
    from matplotlib.figure import Figure

    runs = [load_series(d) for d in work_dirs]
    labels = labels or _labels(work_dirs)
    if not keys:
        found = []
        for run in runs:
            found += [k for k in run if k not in found]
        keys = found
    missing = [k for k in keys if not any(k in run for run in runs)]
    if missing:
        have = sorted({k for run in runs for k in run})
        from .errors import closest
        near = closest(missing[0], have, n=1)
        hint = f' Did you mean {near[0]!r}?' if near else ''
        raise ConfigError(f'no run has the key {missing[0]!r}.{hint} Keys in these runs: '
                          f'{", ".join(have)}')
    cols = min(len(keys), 3)
    rows = math.ceil(len(keys) / cols)
    width, height = size or (400 * cols + 100, 320 * rows + 60)
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for run, label in zip(runs, labels):
            points = run.get(key)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=label, marker='o' if len(xs) < 30 else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel('iteration')
        ax.grid(True, alpha=0.3)
        if key == 'lr' or 'lr' in key.split('/')[-1:]:
            ax.ticklabel_format(axis='y', style='sci', scilimits=(-3, 3))
        ax.legend(fontsize='small')
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def save_plot(work_dirs: list, out: str | Path, keys: list[str] | None = None,
              size: tuple[int, int] | None = None, dpi: int = 100) -> Path:
    fig = plot_runs(work_dirs, keys, size, dpi)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format='png')
    return out


def _labels(work_dirs: list) -> list[str]:
    names = [Path(d).resolve().name for d in work_dirs]
    if len(set(names)) == len(names):
        return names
    return [str(d) for d in work_dirs]


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split('x'))
        if w > 0 and h > 0:
            return w, h
    except ValueError:
        pass
    raise ConfigError(f'--size must be WIDTHxHEIGHT in pixels, e.g. 1200x800; got {text!r}')


def main(args) -> int:
    """The ``plot`` subcommand."""
    import importlib.util
    if importlib.util.find_spec('matplotlib') is None:
        raise ConfigError("scale-runner plot needs matplotlib: pip install matplotlib "
                          "(or pip install 'scale_runner[plot]')")
    keys = [k.strip() for k in args.keys.split(',') if k.strip()] if args.keys else None
    size = parse_size(args.size) if args.size else None
    out = save_plot(args.work_dirs, args.out, keys, size, args.dpi)
    print(f'wrote {out}')
    return 0
