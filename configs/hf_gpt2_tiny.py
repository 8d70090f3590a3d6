# char_lm's data and schedule, but the model is a randomly initialised Hugging Face transformers
# GPT-2 built from a tiny GPT2Config (no download; pip install 'scale_runner[hf]'). The batch
# dict {input_ids, labels} goes to model(**batch) and the runner trains on outputs.loss.
_base_ = ['char_lm.py']
model = dict(_delete_=True, type='tiny_gpt2', vocab_size=256, n_positions=128, n_embd=128,
             n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
             activation_function='gelu_pytorch_tanh')  # fused; GPT-2's 'gelu_new' is slow on CPU
work_dir = 'work_dirs/hf_gpt2_tiny'
