"""tests/test_registry.py's probe, run in a fresh interpreter (no registry loaded yet): prints
one line per check, ``NAME value...``, for the tests to read."""

import sys

from scale_runner.registry import (
    DATA_SAMPLERS,
    EVALUATORS,
    HOOKS,
    LOOPS,
    OPTIMIZERS,
    RUNNERS,
)

print('LAZY_MODULES', 'scale_runner.loops' in sys.modules, 'scale_runner.hooks' in sys.modules)
from scale_runner.registry import PARAM_SCHEDULERS  # noqa: E402  (after the check above)

# the next two checks are about registries that have not been loaded yet
assert not OPTIMIZERS._loaded and not PARAM_SCHEDULERS._loaded


# taking a built-in's name is decided at the user's call (the built-ins load first), not later
# inside the built-ins' import: the user's class shadows the built-in, with a warning
class SGD:
    pass


import warnings  # noqa: E402

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
        OPTIMIZERS.register_module(module=SGD)
    except KeyError:
        print('CLASH REFUSED')
    else:
        said = any('instead of the built-in torch.optim' in str(w.message) for w in caught)
        print('CLASH', 'SHADOWED_WITH_WARNING' if said else 'SHADOWED_SILENTLY')
print('CLASH_KEPT', OPTIMIZERS.get('SGD').__module__)
# a new name registered before the lazy load must not hide the built-ins
PARAM_SCHEDULERS.register_module(name='MySched', module=dict)
print('EARLY_REGISTER', 'StepLR' in PARAM_SCHEDULERS, 'MySched' in PARAM_SCHEDULERS)
print('LAZY_LOOPS', 'EpochBasedTrainLoop' in LOOPS)
print('LAZY_HOOKS', 'CheckpointHook' in HOOKS, 'LoggerHook' in HOOKS, 'IterTimerHook' in HOOKS,
      'ParamSchedulerHook' in HOOKS)
print('LAZY_OTHERS', 'DefaultSampler' in DATA_SAMPLERS, 'Evaluator' in EVALUATORS,
      'Runner' in RUNNERS)
print('ALL_LOOPS', 'IterBasedTrainLoop' in LOOPS, 'ValLoop' in LOOPS, 'TestLoop' in LOOPS)
