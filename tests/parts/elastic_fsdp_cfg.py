# tests/test_elastic_resume.py's FSDP2 config: elastic_cfg.py sharded with fully_shard on CPU
# ranks (accelerator.fsdp), with an EMA average that is sharded like the parameters.
_base_ = ['elastic_cfg.py']
model = dict(type='IndexedMLP')
accelerator = dict(fsdp=dict(fsdp_version=2))
custom_hooks = [dict(type='RecordIndices'), dict(type='EMAHook', momentum=0.1)]
