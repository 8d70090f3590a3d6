"""Resume cost against the position: resuming at iteration 20,000 of a map-style dataset must
take about as long as resuming at iteration 100 (the sampler starts at the offset; skipped
samples are never read).

For each position N: train N iterations (checkpoint at the end), then time a resumed run from
``train()`` to the end of its first iteration, counting dataset reads. Medians of --reps.

    python bench/resume_cost.py --reps 5
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


class CountingData(torch.utils.data.Dataset):
    def __init__(self, n=8 * 25_000):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 32, generator=g), torch.randn(n, 32, generator=g)
        self.reads = 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32)

    def forward(self, x, y):
        return torch.nn.functional.mse_loss(self.lin(x), y)


def run(work_dir, data, max_iters, resume, clock=None):
    from accelerate.state import AcceleratorState, GradientState

    from scale_runner import Hook, Runner
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    class First(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            if clock is not None and 'end' not in clock:
                clock['end'] = time.perf_counter()

    r = Runner(model=Net(), work_dir=work_dir,
               train_dataloader=dict(dataset=data, batch_size=8,
                                     sampler=dict(type='DefaultSampler', shuffle=True)),
               train_cfg=dict(by_epoch=False, max_iters=max_iters),
               optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
               default_hooks=dict(logger=dict(interval=10_000),
                                  checkpoint=dict(interval=-1, save_last=True)),
               custom_hooks=[First()], resume=resume, randomness=dict(seed=0),
               accelerator=dict(cpu=True), log_level='WARNING')
    if clock is not None:
        clock['start'] = time.perf_counter()
    r.train()
    r.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--positions', default='100,20000')
    args = p.parse_args()
    torch.set_num_threads(1)
    data = CountingData()
    out = {}
    for pos in map(int, args.positions.split(',')):
        work_dir = tempfile.mkdtemp()
        run(work_dir, data, pos, resume=False)
        times, reads = [], []
        for _ in range(args.reps):
            clock: dict = {}
            data.reads = 0
            run(work_dir + f'/r{len(times)}', data, pos + 1, resume=work_dir + f'/checkpoints/iter_{pos}',
                clock=clock)
            times.append(clock['end'] - clock['start'])
            reads.append(data.reads)
        out[pos] = statistics.median(times)
        print(f'resume at iteration {pos:>6}: {out[pos] * 1e3:7.1f} ms to the first step, '
              f'{statistics.median(reads):.0f} samples read')
    first, last = out[min(out)], out[max(out)]
    print(f'ratio {max(out)} vs {min(out)}: {last / first:.3f}')


if __name__ == '__main__':
    main()
