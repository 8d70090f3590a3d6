"""tests/test_cli.py's hook for the 2-process ``accelerate launch`` run (``custom_imports``)."""

from safetensors.torch import save_file

from scale_runner.hooks.hook import Hook
from scale_runner.registry import HOOKS


@HOOKS.register_module()
class DumpRankWeights(Hook):
    """Each rank writes the weights it ended with."""

    def after_train(self, runner):
        from scale_runner.model import unwrap
        sd = {k: v.detach().cpu().contiguous().clone()
              for k, v in unwrap(runner.model).state_dict().items()}
        save_file(sd, str(runner.work_dir / f'final_rank{runner.accelerator.process_index}.safetensors'))
