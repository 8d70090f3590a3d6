"""``TrainState``: the one place where training progress is counted."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TrainState:
    """Counters of *completed* work; they advance before the matching ``after_*`` hook.

    ``epoch``: epochs finished; ``iter``: train iterations (micro-batches) finished;
    ``inner_iter``: iterations finished in the current epoch; ``max_*``: the schedule.
    """

    epoch: int = 0
    iter: int = 0
    inner_iter: int = 0
    max_epochs: int | None = None
    max_iters: int | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in ('epoch', 'iter', 'inner_iter'):
            setattr(self, key, int(state[key]))
