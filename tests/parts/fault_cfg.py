# tests/test_fault_tolerance.py's config: a dropout MLP (RNG matters for exact resume).
custom_imports = dict(imports=['sr_resume_parts', 'fault_parts'])
model = dict(type='DropoutNet')
train_dataloader = dict(dataset=dict(type='ResumeData', size=40), batch_size=4,
                        sampler=dict(type='DefaultSampler', shuffle=True))
train_cfg = dict(by_epoch=False, max_iters=12, val_interval=0)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=0.01))
default_hooks = dict(logger=dict(interval=2), checkpoint=dict(interval=4, by_epoch=False, max_keep_ckpts=2))
custom_hooks = [dict(type='FaultHook')]
randomness = dict(seed=0)
