# tests/test_deepspeed.py's config: DeepSpeed ZeRO on the CPU over gloo, 24 indexed samples,
# 2 per process per iteration, a dropout-free MLP whose layers split over 2 ranks.
custom_imports = dict(imports=['elastic_parts', 'sr_resume_parts'])
model = dict(type='IndexedMLP')
train_dataloader = dict(dataset=dict(type='IndexedToy', size=24), batch_size=2,
                        sampler=dict(type='DefaultSampler', shuffle=True))
train_cfg = dict(by_epoch=False, max_iters=6, val_interval=0)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=0.01), clip_grad=dict(max_norm=1.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=20)]
accelerator = dict(deepspeed=dict(zero_optimization=dict(stage=2)))
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=1, by_epoch=False, max_keep_ckpts=-1))
custom_hooks = [dict(type='KillHook')]  # SR_KILL='iter:n': SIGKILL there
randomness = dict(seed=0)
