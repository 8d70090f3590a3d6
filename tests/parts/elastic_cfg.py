# tests/test_elastic_resume.py's config: 24 indexed samples, 2 per process per iteration.
custom_imports = dict(imports=['elastic_parts'])
model = dict(type='IndexedRegressor')
train_dataloader = dict(dataset=dict(type='IndexedToy', size=24), batch_size=2,
                        sampler=dict(type='DefaultSampler', shuffle=True))
train_cfg = dict(by_epoch=False, max_iters=3, val_interval=0)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=0.01))
param_scheduler = [dict(type='LinearLR', start_factor=0.5, by_epoch=False, begin=0, end=20)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, by_epoch=False, max_keep_ckpts=2))
custom_hooks = [dict(type='RecordIndices')]
randomness = dict(seed=0)
