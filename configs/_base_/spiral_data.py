# Data for the two-spiral example: generated in memory, nothing to download.
custom_imports = dict(imports=['scale_runner.examples.toy'])
train_dataloader = dict(
    batch_size=64,
    dataset=dict(type='SpiralDataset', size=6000, num_classes=3, noise=0.1, seed=0),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=256,
    dataset=dict(type='SpiralDataset', size=1500, num_classes=3, noise=0.1, seed=1),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Accuracy', topk=1)
val_cfg = dict()
test_dataloader = val_dataloader
test_evaluator = val_evaluator
test_cfg = dict()
