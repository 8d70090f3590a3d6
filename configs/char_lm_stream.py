# char_lm trained from a stream: the same standard-library text (files a-s), written at first
# use as 8 shuffled JSON-lines shards under work_dirs/char_lm_stream/stream_data, streamed with
# `datasets` (streaming=True), tokenized to bytes on the fly, packed into 128-byte blocks (a NUL
# byte between files) and shuffled by a 2,048-block buffer. Resumes exactly (the stream's
# position, buffer and packing remainder are in each rank's checkpoint files). The validation
# data is char_lm's (files x-z, map-style), so the losses compare.
_base_ = ['char_lm.py']

work_dir = 'work_dirs/char_lm_stream'
train_dataloader = dict(
    _delete_=True,
    batch_size=16,
    num_workers=0,   # 0, 1, 2, 4 or 8 readers per process: the 8 shards must divide
    dataset=dict(type='StdlibTextStream', out_dir='work_dirs/char_lm_stream/stream_data',
                 shards=8, map=dict(type='byte_ids'), map_kwargs=dict(remove_columns=['text']),
                 pack=dict(block_size=128, eos_id=0), shuffle=dict(buffer_size=2048)),
)
custom_imports = dict(imports=['scale_runner.examples.char_lm', 'scale_runner.examples.stdlib_stream'])
