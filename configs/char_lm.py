# The default job: a character-level (byte-level) transformer LM trained on the Python standard
# library's source, about 3 minutes on 2 idle CPU cores. Validation every 500 iterations:
# val_loss (nats per byte) and perplexity; a generated sample is printed at the end
# (also in work_dir/<timestamp>/sample.txt). Unigram baseline:
#   python -m scale_runner.examples.unigram_baseline configs/char_lm.py
_base_ = ['_base_/stdlib_text.py']

model = dict(type='CharTransformerLM', vocab_size=256, block_size=128, d_model=128, n_layer=3,
             n_head=4, dropout=0.0)   # block_size must match the data's map.block_size
work_dir = 'work_dirs/char_lm'
train_cfg = dict(by_epoch=False, max_iters=1000, val_interval=500)
optim_wrapper = dict(optimizer=dict(type='AdamW', lr=3e-3, betas=(0.9, 0.99), weight_decay=0.01),
                     clip_grad=dict(max_norm=1.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=30),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=30, end=1000, eta_min=1e-4),
]
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(interval=500, max_keep_ckpts=2))
custom_hooks = [dict(type='TextSampleHook', prompt='def ', max_new_tokens=200)]
trackers = [dict(type='tensorboard')]     # plus work_dir/<timestamp>/scalars.jsonl, always
randomness = dict(seed=42)
