"""scale_runner: MMEngine's Runner design on Hugging Face Accelerate.

The public names below are imported on first use, so ``import scale_runner`` (and
``scale-runner --help``) does not import torch or accelerate.
"""
from __future__ import annotations

import importlib

__version__ = '0.1.0'

_EXPORTS = {
    'Runner': 'runner', 'Config': 'config', 'ConfigDict': 'config', 'ConfigError': 'errors',
    'ModelOutputError': 'errors',
    'Registry': 'registry', 'RUNNERS': 'registry', 'LOOPS': 'registry', 'HOOKS': 'registry',
    'MODELS': 'registry', 'DATASETS': 'registry', 'DATA_SAMPLERS': 'registry',
    'FUNCTIONS': 'registry', 'OPTIMIZERS': 'registry', 'OPTIM_WRAPPERS': 'registry',
    'PARAM_SCHEDULERS': 'registry', 'METRICS': 'registry', 'EVALUATORS': 'registry',
    'TRACKERS': 'registry',
    'BaseLoop': 'loops', 'EpochBasedTrainLoop': 'loops', 'IterBasedTrainLoop': 'loops',
    'ValLoop': 'loops', 'TestLoop': 'loops',
    'Hook': 'hooks', 'CheckpointHook': 'hooks', 'IterTimerHook': 'hooks', 'LoggerHook': 'hooks',
    'ParamSchedulerHook': 'hooks',
    'BaseModel': 'model', 'OptimWrapper': 'optim', 'TrainState': 'state',
    'BaseMetric': 'evaluation', 'Evaluator': 'evaluation',
    'DefaultSampler': 'data', 'InfiniteSampler': 'data',
    'CheckpointError': 'checkpoint',
    # MMEngine names (see README, "Coming from MMEngine")
    'MessageHub': 'message_hub', 'HistoryBuffer': 'message_hub', 'RuntimeInfoHook': 'hooks',
    'OptimWrapperDict': 'optim_wrapper_dict', 'OPTIM_WRAPPER_CONSTRUCTORS': 'registry',
    'DefaultOptimWrapperConstructor': 'optim_constructor',
    'MultiOptimWrapperConstructor': 'optim_constructor',
    'BaseDataPreprocessor': 'data_preprocessor', 'ImgDataPreprocessor': 'data_preprocessor',
    'DictAction': 'config', 'LogProcessor': 'log_processor', 'ParamScheduler': 'schedulers',
}

__all__ = sorted(_EXPORTS) + ['__version__']


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{module}'), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
