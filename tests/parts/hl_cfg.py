# tests/test_hook_library_dist.py's config: 3 epochs on 2 ranks, rank 1's loss NaN at iteration 11.
custom_imports = dict(imports=['hl_parts'])
model = dict(type='BNNet', nan_at=11, nan_rank=1)
train_dataloader = dict(dataset=dict(type='Reg', size=64), batch_size=8,
                        sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(dataset=dict(type='Reg', size=16, seed=1), batch_size=8)
val_evaluator = dict(type='MSE')
val_cfg = dict()
train_cfg = dict(by_epoch=True, max_epochs=3)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.01))
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(by_epoch=False, interval=1, max_keep_ckpts=-1))
custom_hooks = [dict(type='Probe'), dict(type='SyncBuffersHook'), dict(type='EMAHook', momentum=0.3)]
randomness = dict(seed=0)
experiment_name = 'run'
