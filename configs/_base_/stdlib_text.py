# Data for the character-level LM examples: the Python standard library's own source files,
# present on every machine (found via sysconfig), read by `datasets`' local `text` loader (one
# row per file) and cut into fixed-length blocks of UTF-8 byte ids by the registered `char_blocks`
# map. A deterministic, sorted selection of the top-level modules: files starting with a-s train,
# the held-out files starting with x-z validate. Nothing is downloaded.
import sysconfig

_stdlib = sysconfig.get_paths()['stdlib']
_text = dict(type='HFDataset', path='text', sample_by='document',
             map=dict(type='char_blocks', block_size=128),
             map_kwargs=dict(batched=True, remove_columns=['text']),
             columns=['input_ids', 'labels'])

custom_imports = dict(imports=['scale_runner.examples.char_lm'])
train_dataloader = dict(
    batch_size=16,
    dataset=dict(_text, data_files=f'{_stdlib}/[a-s]*.py'),
    sampler=dict(type='DefaultSampler', shuffle=True),
)
val_dataloader = dict(
    batch_size=64,
    dataset=dict(_text, data_files=f'{_stdlib}/[x-z]*.py'),
    sampler=dict(type='DefaultSampler', shuffle=False),
)
val_evaluator = dict(type='Perplexity')   # the loops add val_loss (mean nats per byte) themselves
val_cfg = dict()
test_dataloader = val_dataloader
test_evaluator = val_evaluator
test_cfg = dict()
