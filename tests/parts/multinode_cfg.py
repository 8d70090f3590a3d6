# tests/test_multinode.py's config: 2 processes x 4 samples per iteration, 8 iterations per pass.
custom_imports = dict(imports=['multinode_parts'])
model = dict(type='MultinodeNet')
train_dataloader = dict(dataset=dict(type='MultinodeData', size=64), batch_size=4,
                        sampler=dict(type='DefaultSampler', shuffle=True))
train_cfg = dict(by_epoch=False, max_iters=6, val_interval=0)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=0.01, weight_decay=0.01),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=4)]
default_hooks = dict(logger=dict(interval=2), checkpoint=dict(interval=4, by_epoch=False))
custom_hooks = [dict(type='MultinodeGate')]
randomness = dict(seed=3)
