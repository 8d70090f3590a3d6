"""tests/test_accelerate.py's hook for its multi-process runs (ddp_cfg.py imports it)."""

import json

from safetensors.torch import save_file

from scale_runner.hooks.hook import Hook
from scale_runner.model import unwrap
from scale_runner.registry import HOOKS


@HOOKS.register_module()
class RankDump(Hook):
    """Every rank: a marker per checkpoint save it took part in; its weights and counters at the end."""

    def before_save_checkpoint(self, runner, checkpoint):
        (runner.work_dir / f'saved_iter{runner.iter}_rank{runner.accelerator.process_index}').touch()

    def after_train(self, runner):
        rank = runner.accelerator.process_index
        sd = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap(runner.model).state_dict().items()}
        save_file(sd, str(runner.work_dir / f'final_rank{rank}.safetensors'))
        ow = runner.optim_wrapper
        (runner.work_dir / f'counters_rank{rank}.json').write_text(json.dumps(dict(
            iter=runner.iter, epoch=runner.epoch, updates=ow.update_count, lr=ow.get_lr()['lr'][0],
            processes=runner.accelerator.num_processes)))
