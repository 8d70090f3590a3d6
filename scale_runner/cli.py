"""``scale-runner train|val|test|config|hooks CONFIG [--cfg-options K=V ...]``.

Heavy imports (torch, accelerate) happen inside the commands, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='scale-runner',
        description='Train, validate and test models from config files (MMEngine-style runner on '
                    'Hugging Face Accelerate). Multi-process: accelerate launch -m scale_runner train CFG')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def common(sp):
        sp.add_argument('config', help='config file (.py, .yaml, .yml or .json)')
        sp.add_argument('--work-dir', help='override work_dir')
        sp.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, e.g. train_cfg.max_epochs=3 model.dims=[4,8]')
        return sp

    tr = common(sub.add_parser('train', help='train a model'))
    tr.add_argument('--resume', nargs='?', const=True, default=None, metavar='PATH',
                    help='resume from the latest checkpoint in the work dir, or from PATH')
    tr.add_argument('--load-from', help='initialise weights from a checkpoint (no training state)')
    for name in ('val', 'test'):
        sp = common(sub.add_parser(name, help=f'run the {name} loop'))
        sp.add_argument('--checkpoint', help='weights to evaluate (checkpoint dir or .safetensors)')
    common(sub.add_parser('config', help='print the resolved config'))
    common(sub.add_parser('hooks', help='print the hooks that run at each stage, in order'))
    return p


def load_config(args):
    from .config import Config, parse_cli_options
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(parse_cli_options(args.cfg_options))
    if args.work_dir:
        cfg['work_dir'] = args.work_dir
    elif 'work_dir' not in cfg:
        from pathlib import Path
        cfg['work_dir'] = str(Path('work_dirs') / Path(args.config).stem)
    if getattr(args, 'resume', None) is not None:
        cfg['resume'] = args.resume
    if getattr(args, 'load_from', None):
        cfg['load_from'] = args.load_from
    if getattr(args, 'checkpoint', None):
        cfg['load_from'] = args.checkpoint
    return cfg


def run(args) -> int:
    cfg = load_config(args)
    if args.command == 'config':
        print(cfg.pretty_text, end='')
        return 0
    from .registry import RUNNERS
    runner = RUNNERS.build(cfg)
    if args.command == 'hooks':
        print(runner.get_hooks_info())
        return 0
    try:
        result = getattr(runner, args.command)()
    finally:
        runner.close()
    if result and runner.accelerator.is_main_process:
        width = max(len(k) for k in result)
        print('\n'.join(f'{k:<{width}}  {v}' for k, v in result.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .errors import ConfigError
    try:
        return run(args)
    except ConfigError as e:
        print(f'scale-runner: config error: {e}', file=sys.stderr)
        return 2
    except BrokenPipeError:  # `scale-runner hooks CFG | head`
        sys.stderr.close()
        return 0
    except Exception as e:
        # A checkpoint that is missing, damaged or does not fit: say so, without a traceback.
        ckpt = sys.modules.get(f'{__package__}.checkpoint')  # imported only if a run got that far
        if ckpt is None or not isinstance(e, ckpt.CheckpointError):
            raise
        print(f'scale-runner: checkpoint error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    raise SystemExit(main())
