"""Checkpoints: the files and their integrity (``format.py``), sharded tensors on
torch.distributed.checkpoint (``sharded.py``), what a run saves and restores (``state.py``),
the ``resume`` argument (``resume.py``) and ``scale-runner export`` (``export.py``)."""
from .export import export_weights
from .format import (FORMAT_VERSION, LATEST, MANIFEST, CheckpointError, CheckpointWriter,
                     candidates, find_resumable, join_tensors, read_checkpoint,
                     read_model_weights, set_latest, split_tensors, verify, whole, whole_weights)
from .resume import resolve_resume
from .state import collect_state, load_weights, restore_state, state_parts

__all__ = ['FORMAT_VERSION', 'LATEST', 'MANIFEST', 'CheckpointError', 'CheckpointWriter',
           'candidates', 'collect_state', 'export_weights', 'find_resumable', 'join_tensors',
           'load_weights', 'read_checkpoint', 'read_model_weights', 'resolve_resume',
           'restore_state', 'set_latest', 'split_tensors', 'state_parts', 'verify', 'whole',
           'whole_weights']
