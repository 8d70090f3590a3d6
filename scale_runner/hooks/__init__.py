"""Hooks: the base class and the built-in hooks."""
from .checkpoint_hook import CheckpointHook
from .hook import PRIORITIES, STAGES, Hook, get_priority
from .iter_timer_hook import IterTimerHook
from .logger_hook import LoggerHook
from .param_scheduler_hook import ParamSchedulerHook
from .sampler_seed_hook import DistSamplerSeedHook
from .ema_hook import EMAHook
from .early_stopping_hook import EarlyStoppingHook
from .nan_guard_hook import NanGuardHook, NonFiniteLossError
from .profiler_hook import ProfilerHook
from .empty_cache_hook import EmptyCacheHook
from .sync_buffers_hook import SyncBuffersHook
from .preemption_hook import PreemptionHook
from .runtime_info_hook import RuntimeInfoHook

__all__ = ['Hook', 'PRIORITIES', 'STAGES', 'get_priority', 'CheckpointHook', 'IterTimerHook',
           'LoggerHook', 'ParamSchedulerHook', 'DistSamplerSeedHook',
           'EMAHook', 'EarlyStoppingHook', 'NanGuardHook', 'NonFiniteLossError', 'ProfilerHook',
           'EmptyCacheHook', 'SyncBuffersHook', 'PreemptionHook', 'RuntimeInfoHook']
