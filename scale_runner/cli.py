"""``scale-runner train|val|test|config|hooks CONFIG [--cfg-options K=V ...]``,
``scale-runner export CKPT OUT.safetensors [--ema]``, ``scale-runner plot WORK_DIR... -o curves.png``.

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
    p.add_argument('--debug', action='store_true',
                   help='show the full traceback of config and checkpoint errors '
                        '(also: environment variable SCALE_RUNNER_DEBUG=1)')
    sub = p.add_subparsers(dest='command', required=True, metavar='COMMAND')

    def common(sp):
        sp.add_argument('config', help='config file (.py, .yaml, .yml or .json)')
        sp.add_argument('--work-dir', help='override work_dir')
        sp.add_argument('--cfg-options', nargs='+', default=[], metavar='KEY=VALUE',
                        help='override config keys, e.g. train_cfg.max_epochs=3 model.dims=[4,8]')
        return sp

    tr = common(sub.add_parser('train', help='train a model'))
    tr.add_argument('--resume', nargs='?', const=True, default=None, metavar='PATH',
                    help='resume from the latest checkpoint in the work dir, or from PATH; '
                         '"auto": the same, but start fresh if none was ever written')
    tr.add_argument('--load-from', help='initialise weights from a checkpoint (no training state)')
    for name in ('val', 'test'):
        sp = common(sub.add_parser(name, help=f'run the {name} loop'))
        sp.add_argument('--checkpoint', help='weights to evaluate (checkpoint dir or .safetensors)')
        if name == 'test':
            sp.add_argument('--out', metavar='PREDS.jsonl',
                            help='also write every sample\'s predictions (JSON lines, once per sample)')
    common(sub.add_parser('config', help='print the resolved config'))
    common(sub.add_parser('hooks', help='print the hooks that run at each stage, in order'))
    pl = sub.add_parser('plot', help='draw the scalars.jsonl curves of work dirs as a PNG')
    pl.add_argument('work_dirs', nargs='+', metavar='WORK_DIR',
                    help='work dirs (or run dirs / scalars.jsonl files); several are compared')
    pl.add_argument('--keys', help='comma-separated keys, e.g. loss,lr,val/accuracy (default: all)')
    pl.add_argument('-o', '--out', default='curves.png', help='output PNG (default: curves.png)')
    pl.add_argument('--size', metavar='WxH', help='image size in pixels, e.g. 1200x800')
    pl.add_argument('--dpi', type=int, default=100, help='dots per inch (default: 100)')
    ex = sub.add_parser('export', help='write the weights of a checkpoint to a .safetensors file')
    ex.add_argument('checkpoint', help='checkpoint directory (verified against its manifest)')
    ex.add_argument('output', help='output .safetensors file (weights only)')
    ex.add_argument('--ema', action='store_true',
                    help="the EMAHook's average instead of the training weights")
    for sp in sub.choices.values():  # also after the command: scale-runner train CFG --debug
        sp.add_argument('--debug', action='store_true', default=argparse.SUPPRESS,
                        help='show the full traceback of config and checkpoint errors')
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
    if args.command == 'test' and getattr(args, 'out', None):
        from pathlib import Path
        from .evaluation import add_metric
        cfg['test_evaluator'] = add_metric(cfg.get('test_evaluator'), dict(
            type='DumpPredictions', out_file=str(Path(args.out).resolve())))
    return cfg


def export(args) -> int:
    from .checkpoint import export_weights
    out = export_weights(args.checkpoint, args.output, ema=args.ema)
    kind = 'the EMA average' if args.ema else 'the weights'
    print(f'exported {kind} of {args.checkpoint} to {out}')
    return 0


def run(args) -> int:
    if args.command == 'export':
        return export(args)
    if args.command == 'plot':
        from .plot import main as plot_main
        return plot_main(args)
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
    _end_process_group()
    if runner.accelerator.is_main_process:
        if result:
            print(_metrics_table(result))
        if args.command == 'test':
            import json
            path = runner.log_dir / 'test_metrics.json'
            path.write_text(json.dumps({k: _jsonable(v) for k, v in (result or {}).items()}, indent=2))
            print(f'test metrics written to {path}')
    return 0


def _end_process_group() -> None:
    """The CLI owns its process: tear the process group down before the interpreter does
    (torch warns about a leaked group, and gloo's threads destroyed at interpreter teardown
    have aborted a finished run: "terminate called without an active exception")."""
    dist = sys.modules.get('torch.distributed')
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _metrics_table(metrics: dict) -> str:
    width = max(len('metric'), *(len(k) for k in metrics))
    lines = [f'{"metric":<{width}}  value', f'{"-" * width}  {"-" * 10}']
    return '\n'.join(lines + [f'{k:<{width}}  {_jsonable(v)}' for k, v in metrics.items()])


def _jsonable(value):
    if hasattr(value, 'tolist'):  # tensors, numpy values
        value = value.tolist()
    return value if isinstance(value, (int, float, str, bool, list, dict, type(None))) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from os import environ
    from .errors import ConfigError
    debug = args.debug or (environ.get('SCALE_RUNNER_DEBUG', '').strip().lower()
                           not in ('', '0', 'false', 'no'))
    more = '\n(--debug or SCALE_RUNNER_DEBUG=1 shows the full traceback)'
    try:
        return run(args)
    except ConfigError as e:
        if debug:
            raise
        print(f'scale-runner: config error: {e}{more if e.__cause__ else ""}', file=sys.stderr)
        return 2
    except BrokenPipeError:  # `scale-runner hooks CFG | head`
        sys.stderr.close()
        return 0
    except Exception as e:
        # A checkpoint that is missing, damaged or does not fit: say so, without a traceback.
        ckpt = sys.modules.get(f'{__package__}.checkpoint')  # imported only if a run got that far
        if debug or ckpt is None or not isinstance(e, ckpt.CheckpointError):
            raise
        print(f'scale-runner: checkpoint error: {e}{more if e.__cause__ else ""}', file=sys.stderr)
        return 1


def entry() -> None:
    """The ``scale-runner`` command and ``python -m scale_runner``: :func:`main`, then an exit
    that a finished multi-process run cannot abort (see :mod:`scale_runner.shutdown`)."""
    from .shutdown import exit_code, exit_process
    try:
        code = main()
    except BaseException as e:  # as the interpreter would report it, but exit through ours
        code = exit_code(e)
        if not isinstance(e, SystemExit):
            sys.excepthook(type(e), e, e.__traceback__)
    exit_process(code)


if __name__ == '__main__':
    entry()
