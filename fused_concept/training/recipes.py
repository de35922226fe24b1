"""The paper's training settings, and how a run's configuration departs from them.

Values from the authors' released code (christine-zhang1/learning-concepts: conceptlib/config.py,
train.py, data/get_content_words.py, data/embedding_synonyms.py). Keys are `TrainConfig` fields, so
`--recipe paper` can apply them all and every run can print where it departs.
"""

from __future__ import annotations

import dataclasses
import math

PAPER_SETTINGS = {
    # objective
    "lam": 0.5,                 # concept_loss_weight (their ablation sweeps 0, 0.25, 0.5, 0.75, 1)
    "margin": 0.6,              # target_mass: hinge on the concept mass
    # concept sets
    "top_k": 100,               # TOPK_LOGITS
    "max_synonyms": 10,         # POS_CHECK_TOP and FINAL_TOPN
    "threshold": 0.75,          # MIN_COSINE
    "tagging": "paper",         # each distinct word tagged alone, last position per document
    "pos_check": True,          # candidates keep the gold word's POS in context
    # data
    "seq_len": 256,             # max_length, BOS included
    "bos": True,                # add_special_tokens=True (Llama 3 adds BOS)
    # optimisation
    "batch_size": 16,           # 8 per device x 2 accumulation steps
    "epochs": 5,
    "lr": 7e-5,
    "weight_decay": 0.05,
    "warmup_ratio": 0.08,
    "min_lr_ratio": 0.0,        # cosine to 0 (transformers' "cosine" schedule)
    "grad_clip": 1.0,
    "seed": 42,
    # model
    "lora": True,
    "lora_r": 4,
    "lora_alpha": 4,
    "lora_dropout": 0.2,        # on q_proj, k_proj, v_proj, o_proj
    "load_in_4bit": True,       # NF4 base model (bitsandbytes, CUDA)
}

PAPER_SCALE = ("the paper trains Llama-3.2-1B/3B and Qwen3-4B-Base on 8,000 C4 / OpenWebText documents "
               "(1,000 validation, 1,000 test)")


def paper_config(config_class, **overrides):
    """A `config_class` (TrainConfig) with every paper setting, then ``overrides``."""
    return config_class(**{**PAPER_SETTINGS, **overrides})


def departures(config) -> list:
    """``"name=value (paper value)"`` for each paper setting the config does not follow."""
    return [f"{key}={getattr(config, key)!r} (paper {value!r})" for key, value in PAPER_SETTINGS.items()
            if getattr(config, key) != value]


def resolve_schedule(config):
    """The config with ``steps`` from ``epochs`` (ceil(epochs * num_train / batch_size)) and ``warmup_steps``
    from ``warmup_ratio`` (ceil(ratio * steps), as transformers) when those are set."""
    steps = config.steps
    if config.epochs is not None:
        steps = max(1, math.ceil(config.epochs * config.num_train / config.batch_size))
    warmup = config.warmup_steps if config.warmup_ratio is None else math.ceil(config.warmup_ratio * steps)
    return dataclasses.replace(config, steps=steps, warmup_steps=warmup)
