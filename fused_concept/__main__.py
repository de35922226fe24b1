"""Command line: `python -m fused_concept train [options]` or the console script `fused-concept train`.

Every option is a field of `fused_concept.train.TrainConfig` (its help text is the field's); with
no options the embedded default job runs. Under `torchrun --nproc_per_node=N` the same command
trains with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import List, Optional


def _none_or(kind):
    def parse(text: str):
        return None if text.lower() in ("none", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from .train import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fused-concept", description="fused concept loss tools")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="fine-tune a causal LM with the concept objective and evaluate it before/after",
        description="Fine-tune a causal LM with the paper's concept objective (logits never formed), evaluate "
        "the held-out part before and after, write metrics.json and curves.png. Without options: the embedded "
        "default job (SmolLM2-135M, English corpus shipped with Python).",
    )
    _add_config_options(train)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        from ._data import DataError
        from .train import TrainConfig, train

        options = {k: v for k, v in vars(args).items() if k != "command"}
        try:
            train(TrainConfig(**options))
        except DataError as exc:
            parser.exit(2, f"fused-concept train: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
