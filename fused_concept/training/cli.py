"""Command line: `python -m fused_concept {train,eval,sweep} [options]` (console script `fused-concept`).

Every option is a field of `fused_concept.training.config.TrainConfig` (its help text is the field's);
each command shows the fields it uses (`eval` none of the training-only ones). With no options `train`
runs the embedded default job. `--recipe paper` starts from the paper's settings (recipes/paper.toml)
instead of the default job's; options given explicitly still win. Under `torchrun --nproc_per_node=N`,
`train` trains with DistributedDataParallel.

Bad input is refused before any slow work with ONE line naming the option and the value, and exit
status 2: values argparse cannot parse, values the config's rules refuse (`config.validate`), a
`--data` that names no corpus, a `--model` or `--adapters` that does not exist, a setting this machine
cannot run (`--device cuda` without CUDA), and a `--resume` whose checkpoint was written otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import List, Optional

from fused_concept.training import recipes
from fused_concept.training.config import EVAL, SWEEP, TRAIN, ConfigError, TrainConfig, fields_of, validate
from fused_concept.training.data import DataError

# per-command changes to a field's option: eval must name its output folder; a sweep writes elsewhere
_OVERRIDES = {
    EVAL: {"out_dir": dict(required=True, help="output folder: metrics.json, heldout_rows.json"),
           "model": dict(help="base model: a name or path as for train (default: the one the --adapters record, "
                         "else the embedded SmolLM2-135M GGUF)"),
           "word_similarity": dict(help="evaluate SimLex-999 / WordSim-353 Spearman")},
    SWEEP: {"out_dir": dict(default="runs/sweep", help="output folder: sweep.md, sweep.json, sweep.png, lam-*/ "
                            "(default: runs/sweep)")},
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the option and the value), not the whole usage text, and
    options must be spelled out (no prefixes: `--thresh 5` is refused, not taken for --threshold)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_config_options(parser: argparse.ArgumentParser, command: str) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for item in fields_of(command):
        if command == SWEEP and item.name == "lam":
            continue  # a list of values, below
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        extra = _OVERRIDES.get(command, {}).get(item.name, {})
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction,
                                default=item.default, help=item.metadata["help"])
            continue
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else kind
        help_text = item.metadata["help"] + ("" if item.default is None else f" (default: {item.default})")
        options = dict(dest=item.name, type=_none_or(base) if optional else base, default=item.default,
                       help=help_text)
        parser.add_argument(flag, **{**options, **extra})
    parser.add_argument("--recipe", default=recipes.DEFAULT, metavar="NAME_OR_FILE",
                        help="start from a recipe's settings: " + ", ".join(recipes.names())
                        + " (recipes/*.toml in the package) or a .toml file of your own (default: default)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fused-concept", description="fused concept loss tools")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        TRAIN,
        help="fine-tune a causal LM with the concept objective and evaluate it before/after",
        description="Fine-tune a causal LM with the paper's concept objective (logits never formed), evaluate "
        "the held-out part and word similarity before and after, write metrics.json, curves.png and the PEFT "
        "adapters. Without options: the embedded default job (SmolLM2-135M, English corpus shipped with Python).",
    )
    _add_config_options(train, TRAIN)
    evaluate = commands.add_parser(
        EVAL, help="held-out metrics and word similarity of a model, or of the adapters a run saved",
        description="Evaluate the base model, or the PEFT adapters of a run (--adapters RUN/adapters), on the "
        "held-out part the data options define and on SimLex-999 / WordSim-353; writes OUT_DIR/metrics.json.")
    evaluate.add_argument("--adapters", default=None, help="folder written by save_pretrained (a run's adapters/)")
    _add_config_options(evaluate, EVAL)
    sweep = commands.add_parser(
        SWEEP, help="the paper's ablation: train once per lambda on identical data and seed",
        description="Train once per --lam value (same data, concept sets, seed), then write one table "
        "(sweep.md, sweep.json) and one plot (sweep.png) of every metric against lambda to --out-dir.")
    sweep.add_argument("--lam", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="lambda values")
    sweep.add_argument("--seeds", default=None, metavar="S1,S2,...",
                       help="train every lambda once per seed (comma-separated, e.g. 1,2,3) into OUT_DIR/seed-S/; "
                       "intervals then include the spread across seeds (default: the one --seed)")
    _add_config_options(sweep, SWEEP)
    return parser


def _config(parser: argparse.ArgumentParser, argv: Optional[List[str]]):
    """Parse, with the --recipe's values as defaults (so options given explicitly win)."""
    args = parser.parse_args(argv)
    if args.recipe != recipes.DEFAULT:
        sub = parser._subparsers._group_actions[0].choices[args.command]
        shown = {k: v for k, v in recipes.settings(TrainConfig, args.recipe).items() if k in vars(args)}
        if args.command == SWEEP:
            shown.pop("lam", None)
            shown.update(recipes.sweep_defaults(args.recipe))
        sub.set_defaults(**shown)
        args = parser.parse_args(argv)
    names = {item.name for item in fields_of(args.command)} - ({"lam"} if args.command == SWEEP else set())
    return args, TrainConfig(**{k: v for k, v in vars(args).items() if k in names})


def _check(args, config: TrainConfig) -> TrainConfig:
    """Everything the command will need, refused up front (`ConfigError` / `DataError`); returns the config
    the command runs (for `eval --adapters` without --model: on the base model the adapters record)."""
    from fused_concept.training.data import check_data_argument

    if args.command == EVAL:
        from fused_concept.training.evaluate import eval_config

        config = eval_config(config, args.adapters)
    else:
        validate(config, args.command)
    if args.command == SWEEP:
        from fused_concept.training.sweep import check_lams, parse_seeds

        check_lams(args.lam)
        args.seeds = None if args.seeds is None else parse_seeds(args.seeds)
    check_data_argument(config.data)
    return config


def _run(args, config: TrainConfig) -> None:
    if args.command == TRAIN:
        from fused_concept.training.loop import train

        train(config)
    elif args.command == EVAL:
        from fused_concept.training.evaluate import evaluate_run

        evaluate_run(config, adapters=args.adapters)
    else:
        from fused_concept.training.sweep import sweep

        sweep(config, args.lam, config.out_dir, seeds=args.seeds)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    command = "fused-concept"
    try:
        args, config = _config(parser, argv)
        command += " " + args.command
        _run(args, _check(args, config))
    except (ConfigError, DataError, recipes.RecipeError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the reason's text holds
        parser.exit(2, f"{command}: error: {message}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
