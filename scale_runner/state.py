"""``TrainState``: the one place where training progress is counted."""
from __future__ import annotations

from dataclasses import dataclass, field

SAVED = ('epoch', 'iter', 'inner_iter', 'max_epochs', 'max_iters')  # what a checkpoint holds


@dataclass
class TrainState:
    """Counters of *completed* work; they advance before the matching ``after_*`` hook.

    ``epoch``: epochs finished; ``iter``: train iterations (micro-batches) finished;
    ``inner_iter``: iterations finished in the current epoch; ``max_*``: the schedule.

    ``stepped``: whether the current train iteration stepped the optimizer (ended an
    accumulation window and was not dropped by the NaN guard). The train loop clears it before
    each step and ``OptimWrapper.step`` sets it, so in ``after_train_iter`` every hook that acts
    once per optimizer update (parameter schedulers, EMA) reads this one flag. It describes the
    iteration, not the run, and is not saved.

    The optimizer wrapper's gradient accumulation window is read from ``iter`` and
    ``max_iters`` too: the runner binds this object to it (``optim_wrapper.train_state``).
    """

    epoch: int = 0
    iter: int = 0
    inner_iter: int = 0
    max_epochs: int | None = None
    max_iters: int | None = None
    stepped: bool = field(default=False, compare=False)
    resume_sample: int | None = field(default=None, compare=False)

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in SAVED}

    def load_state_dict(self, state: dict) -> None:
        for key in ('epoch', 'iter', 'inner_iter'):
            setattr(self, key, int(state[key]))
