# A second task: classify scikit-learn's bundled 8x8 handwritten digits (no download;
# pip install 'scale_runner[sklearn]') with a small CNN. Epoch-based, validated every epoch,
# keeps the checkpoint with the best validation accuracy (best_accuracy_epoch_<N>).
custom_imports = dict(imports=['scale_runner.examples.digits'])
model = dict(type='DigitsCNN', channels=32, num_classes=10)
work_dir = 'work_dirs/digits_cnn'
train_dataloader = dict(batch_size=32, dataset=dict(type='DigitsDataset', split='train'),
                        sampler=dict(type='DefaultSampler', shuffle=True))
val_dataloader = dict(batch_size=256, dataset=dict(type='DigitsDataset', split='val'),
                      sampler=dict(type='DefaultSampler', shuffle=False))
val_evaluator = dict(type='Accuracy', topk=1)
val_cfg = dict()
test_dataloader = val_dataloader
test_evaluator = val_evaluator
test_cfg = dict()
train_cfg = dict(by_epoch=True, max_epochs=15, val_interval=1)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-4),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=15, eta_min=1e-5,
         convert_to_iter_based=True),
]
default_hooks = dict(logger=dict(interval=20),
                     checkpoint=dict(interval=5, max_keep_ckpts=1, save_best='accuracy'))
trackers = [dict(type='tensorboard')]
randomness = dict(seed=0)
