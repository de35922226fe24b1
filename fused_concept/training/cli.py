"""Command line: `python -m fused_concept {train,eval,sweep} [options]` (console script `fused-concept`).

Every option is a field of `fused_concept.training.config.TrainConfig` (its help text is the field's);
with no options `train` runs the embedded default job. `--recipe paper` starts from the paper's settings
(recipes/paper.toml, `fused_concept.training.recipes.PAPER_SETTINGS`) instead of the default job's;
options given explicitly still win. Under `torchrun --nproc_per_node=N`, `train` trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import List, Optional


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_config_options(parser: argparse.ArgumentParser, skip=()) -> None:
    from fused_concept.training.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = hints[item.name]
        help_text = item.metadata["help"] + ("" if item.default is None else f" (default: {item.default})")
        if kind is bool:
            parser.add_argument(flag, dest=item.name, action=argparse.BooleanOptionalAction,
                                default=item.default, help=item.metadata["help"])
            continue
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else kind
        parser.add_argument(flag, dest=item.name, type=_none_or(base) if optional else base,
                            default=item.default, help=help_text)
    from fused_concept.training import recipes

    parser.add_argument("--recipe", choices=recipes.names(), default=recipes.DEFAULT,
                        help="start from the embedded default job's settings or from a recipe's (recipes/*.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-concept", description="fused concept loss tools")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="fine-tune a causal LM with the concept objective and evaluate it before/after",
        description="Fine-tune a causal LM with the paper's concept objective (logits never formed), evaluate "
        "the held-out part and word similarity before and after, write metrics.json, curves.png and the PEFT "
        "adapters. Without options: the embedded default job (SmolLM2-135M, English corpus shipped with Python).",
    )
    _add_config_options(train)
    evaluate = commands.add_parser(
        "eval", help="held-out metrics and word similarity of a model, or of the adapters a run saved",
        description="Evaluate the base model, or the PEFT adapters of a run (--adapters RUN/adapters), on the "
        "held-out part the data options define and on SimLex-999 / WordSim-353; writes OUT/metrics.json.")
    evaluate.add_argument("--adapters", default=None, help="folder written by save_pretrained (a run's adapters/)")
    evaluate.add_argument("--out", required=True, help="output folder")
    _add_config_options(evaluate)
    sweep = commands.add_parser(
        "sweep", help="the paper's ablation: train once per lambda on identical data and seed",
        description="Train once per --lam value (same data, concept sets, seed), then write one table "
        "(sweep.md, sweep.json) and one plot (sweep.png) of every metric against lambda to --out-dir.")
    sweep.add_argument("--lam", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="lambda values")
    _add_config_options(sweep, skip=("lam",))
    return parser


def _config(parser: argparse.ArgumentParser, argv: Optional[List[str]]):
    """Parse, with the --recipe's values as defaults (so options given explicitly win)."""
    from fused_concept.training import recipes
    from fused_concept.training.config import TrainConfig

    args = parser.parse_args(argv)
    if args.recipe != recipes.DEFAULT:
        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.set_defaults(**{k: v for k, v in recipes.settings(TrainConfig, args.recipe).items() if k in vars(args)})
        args = parser.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)} - ({"lam"} if args.command == "sweep" else set())
    options = {k: v for k, v in vars(args).items() if k in fields}
    return args, TrainConfig(**options)


def main(argv: Optional[List[str]] = None) -> int:
    from fused_concept.training.data import DataError

    parser = build_parser()
    args, config = _config(parser, argv)
    try:
        if args.command == "train":
            from fused_concept.training.loop import train

            train(config)
        elif args.command == "eval":
            from fused_concept.training.evaluate import evaluate_run

            evaluate_run(dataclasses.replace(config, out_dir=args.out), adapters=args.adapters)
        else:
            from fused_concept.training.sweep import sweep

            sweep(config, args.lam, config.out_dir)
    except DataError as exc:
        parser.exit(2, f"fused-concept {args.command}: error: {exc}\n")
    return 0

