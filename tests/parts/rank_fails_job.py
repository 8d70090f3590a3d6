"""tests/test_checkpoint_edges.py's job, on 2 ranks: rank 1 cannot write its partial
gradients (a file-size limit); both ranks write the error they got; argv[1] is the
checkpoint root."""
import os
import resource
import signal
import sys

import torch
from accelerate import Accelerator

from scale_runner.checkpoint import CheckpointError, CheckpointWriter
from scale_runner.shutdown import register_drain

acc = Accelerator(cpu=True)
register_drain()  # what Runner does: no abort at interpreter exit (scale_runner.shutdown)
root = sys.argv[1]
writer = CheckpointWriter(acc)
grads = {'g': torch.zeros(65536)}  # each rank's own 256 KiB file
writer.write(os.path.join(root, 'iter_1'), {'w': torch.ones(4)}, {'i': 1}, {'grad': grads})
if acc.process_index == 1:  # only rank 1's disk is full
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, resource.RLIM_INFINITY))
try:
    writer.write(os.path.join(root, 'iter_2'), {'w': torch.ones(4)}, {'i': 2}, {'grad': grads})
    result = 'saved'
except CheckpointError as e:
    result = str(e)
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
with open(os.path.join(root, '..', f'rank{acc.process_index}.txt'), 'w') as f:
    f.write(result)
