"""``OptimWrapperDict``: one optimizer wrapper per sub-module (MMEngine's, for GANs and the like).

The model's own ``train_step(data, optim_wrapper)`` uses each wrapper by name::

    def train_step(self, data, optim_wrapper):
        d_loss = ...
        optim_wrapper['discriminator'].update_params(d_loss)
        g_loss = ...
        optim_wrapper['generator'].update_params(g_loss)
        return dict(loss_d=d_loss.detach(), loss_g=g_loss.detach())

Every wrapper reads its accumulation window from the runner's one ``TrainState``. The dict
itself does not step (``update_params`` and friends raise, as in MMEngine); it forwards
``zero_grad``, the runner's binding, the lrs (``<name>.lr``) and the checkpoint state
(``{name: wrapper state}``).
"""
from __future__ import annotations

from .errors import ConfigError, closest
from .optim import OptimWrapper


class OptimWrapperDict:
    def __init__(self, **optim_wrappers: OptimWrapper):
        if not optim_wrappers:
            raise ConfigError('OptimWrapperDict needs at least one optimizer wrapper, e.g. '
                              'OptimWrapperDict(generator=OptimWrapper(...), discriminator=...)')
        for name, wrapper in optim_wrappers.items():
            if not isinstance(wrapper, OptimWrapper):
                raise ConfigError(f'optim_wrapper.{name} = {wrapper!r} is not an OptimWrapper: '
                                  f"give dict(optimizer=dict(type='Adam', lr=...)) or a built "
                                  f'OptimWrapper')
        self.optim_wrappers = dict(optim_wrappers)

    # ---- the mapping --------------------------------------------------------------------
    def __getitem__(self, key: str) -> OptimWrapper:
        try:
            return self.optim_wrappers[key]
        except KeyError:
            near = closest(str(key), self.optim_wrappers, n=1)
            did = f' Did you mean {near[0]!r}?' if near else ''
            raise KeyError(f'{key!r} is not an optimizer wrapper of this OptimWrapperDict (it has '
                           f'{list(self.optim_wrappers)}).{did}') from None

    def __contains__(self, key) -> bool:
        return key in self.optim_wrappers

    def __len__(self) -> int:
        return len(self.optim_wrappers)

    def __iter__(self):
        return iter(self.optim_wrappers)

    def keys(self):
        return self.optim_wrappers.keys()

    def values(self):
        return self.optim_wrappers.values()

    def items(self):
        return self.optim_wrappers.items()

    # ---- what the runner and hooks use ----------------------------------------------------
    def _set_all(self, name: str, value) -> None:
        for wrapper in self.optim_wrappers.values():
            setattr(wrapper, name, value)

    train_state = property(lambda self: next(iter(self.optim_wrappers.values())).train_state,
                           lambda self, state: self._set_all('train_state', state))
    loss_guard = property(lambda self: next(iter(self.optim_wrappers.values())).loss_guard,
                          lambda self, guard: self._set_all('loss_guard', guard))
    grad_norm = scaler_skips = clip_grad = None  # per wrapper: optim_wrapper[name].grad_norm

    @property
    def accumulative_counts(self) -> int:
        """The largest window of the wrappers (1 if none accumulates)."""
        return max(w.accumulative_counts for w in self.optim_wrappers.values())

    def bind(self, accelerator, model) -> None:
        for wrapper in self.optim_wrappers.values():
            wrapper.bind(accelerator, model)

    def initialize_count_status(self, model, init_counts: int, max_counts: int | None) -> None:
        for wrapper in self.optim_wrappers.values():
            wrapper.initialize_count_status(model, init_counts, max_counts)

    def zero_grad(self, **kwargs) -> None:
        for wrapper in self.optim_wrappers.values():
            wrapper.zero_grad(**kwargs)

    def get_lr(self) -> dict[str, list[float]]:
        return {f'{name}.lr': w.get_lr()['lr'] for name, w in self.optim_wrappers.items()}

    def get_momentum(self) -> dict[str, list[float]]:
        return {f'{name}.momentum': w.get_momentum()['momentum']
                for name, w in self.optim_wrappers.items()}

    def _not_here(self, what: str):
        raise NotImplementedError(
            f'OptimWrapperDict.{what}: call it on one wrapper, optim_wrapper[name].{what}(...), '
            f'in the model\'s train_step (names: {list(self.optim_wrappers)})')

    def update_params(self, *args, **kwargs):
        self._not_here('update_params')

    def backward(self, *args, **kwargs):
        self._not_here('backward')

    def step(self, *args, **kwargs):
        self._not_here('step')

    def optim_context(self, *args, **kwargs):
        self._not_here('optim_context')

    # ---- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {name: w.state_dict() for name, w in self.optim_wrappers.items()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != set(self.optim_wrappers):
            raise ConfigError(f'the checkpoint holds optimizer states for {sorted(state)} but this '
                              f"run's optim_wrapper has {sorted(self.optim_wrappers)}: resume with "
                              f'the same optimizer wrappers, or use load_from for the weights only')
        for name, wrapper in self.optim_wrappers.items():
            wrapper.load_state_dict(state[name])

    def __repr__(self) -> str:
        inner = ', '.join(f'{k}={v!r}' for k, v in self.optim_wrappers.items())
        return f'OptimWrapperDict({inner})'


def wrappers_of(optim_wrapper) -> list[OptimWrapper]:
    """The wrappers inside ``optim_wrapper``: itself, or each of an ``OptimWrapperDict``."""
    if isinstance(optim_wrapper, OptimWrapperDict):
        return list(optim_wrapper.values())
    return [optim_wrapper]
