# char_lm on one GPU: a bigger model (10.8M parameters), longer context, bf16, larger batch.
#   scale-runner train configs/char_lm_gpu.py
#   accelerate launch --config_file launch/multi_gpu.yaml --num_processes 8 -m scale_runner train configs/char_lm_gpu.py
_base_ = ['char_lm.py']
_block = 256
model = dict(block_size=_block, d_model=384, n_layer=6, n_head=6, dropout=0.1)
train_dataloader = dict(batch_size=64, num_workers=2, dataset=dict(map=dict(block_size=_block)))
val_dataloader = dict(batch_size=128, dataset=dict(map=dict(block_size=_block)))
test_dataloader = val_dataloader
accelerator = dict(mixed_precision='bf16')
optim_wrapper = dict(optimizer=dict(lr=1e-3))
work_dir = 'work_dirs/char_lm_gpu'
