# tests/test_accelerate.py's config for its multi-process runs; RankDump: rank_dump.py.
custom_imports = dict(imports=['scale_runner.examples.toy', 'rank_dump'])
model = dict(type='MLPClassifier', hidden=32, depth=2, num_classes=3)
train_dataloader = dict(dataset=dict(type='SpiralDataset', size=96, seed=1), batch_size=8,
                        sampler=dict(type='DefaultSampler', shuffle=True))
train_cfg = dict(by_epoch=True, max_epochs=2)
optim_wrapper = dict(optimizer=dict(type='SGD', lr=0.2, momentum=0.9), clip_grad=dict(max_norm=1.0))
param_scheduler = [dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=6),
                   dict(type='CosineAnnealingLR', by_epoch=False, begin=6, end=12, eta_min=0.01)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1))
custom_hooks = [dict(type='RankDump')]
randomness = dict(seed=0)
