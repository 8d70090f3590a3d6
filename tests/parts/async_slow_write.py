"""tests/test_async_checkpoint.py's job: a background checkpoint write that stalls at
iteration 3 (the test SIGKILLs the process there); argv[1] is the work directory."""
import sys, time
import torch
import scale_runner.checkpoint.format as fmt
from scale_runner import Runner
from elastic_parts import IndexedRegressor, IndexedToy

real = fmt._write_tensors
def slow(path, tensors, io):
    if path.parent.name == '.tmp-iter_3':
        print('WRITING', flush=True)
        time.sleep(60)  # killed here, inside the background write of iteration 3
    return real(path, tensors, io)
fmt._write_tensors = slow
torch.manual_seed(0)
Runner(model=IndexedRegressor(), work_dir=sys.argv[1], log_level='WARNING',
       train_dataloader=dict(dataset=IndexedToy(64), batch_size=8),
       train_cfg=dict(by_epoch=False, max_iters=50), optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
       default_hooks=dict(checkpoint=dict(interval=1, async_save=True))).train()
