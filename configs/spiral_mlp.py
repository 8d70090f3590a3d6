# The default job: a 3-class spiral classifier, epoch-based, validated every 2 epochs.
_base_ = ['_base_/spiral_data.py']

model = dict(type='MLPClassifier', hidden=128, depth=3, num_classes=3)
work_dir = 'work_dirs/spiral_mlp'
train_cfg = dict(by_epoch=True, max_epochs=20, val_interval=2)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=3e-3, weight_decay=1e-4),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=100),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=20, eta_min=1e-5,
         convert_to_iter_based=True),
]
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(interval=5, max_keep_ckpts=2))
randomness = dict(seed=42)
