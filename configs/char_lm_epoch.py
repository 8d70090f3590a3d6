# char_lm with an epoch-based loop: one pass over the training blocks (~1,600 iterations at
# batch 16), validated and checkpointed at the end of each epoch.
_base_ = ['char_lm.py']
train_cfg = dict(_delete_=True, by_epoch=True, max_epochs=1, val_interval=1)
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=1, eta_min=1e-4,
         convert_to_iter_based=True),
]
default_hooks = dict(checkpoint=dict(interval=1))
work_dir = 'work_dirs/char_lm_epoch'
