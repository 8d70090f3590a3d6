"""Hooks: the base class and the built-in hooks."""
from .checkpoint_hook import CheckpointHook
from .hook import PRIORITIES, STAGES, Hook, get_priority
from .iter_timer_hook import IterTimerHook
from .logger_hook import LoggerHook
from .param_scheduler_hook import ParamSchedulerHook
from .sampler_seed_hook import DistSamplerSeedHook

__all__ = ['Hook', 'PRIORITIES', 'STAGES', 'get_priority', 'CheckpointHook', 'IterTimerHook',
           'LoggerHook', 'ParamSchedulerHook', 'DistSamplerSeedHook']
