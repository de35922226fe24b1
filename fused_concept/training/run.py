"""Setting up a run: process group and device (`start_run`), the model (`setup_model`), the token data and
concept sets (`setup_data`), what trains (`setup_trainee`: LoRA or every weight, DDP) and the optimizer.

The model never computes its logits in training: `Trunk` is the model WITHOUT its LM head; its forward
returns the final hidden states and the head's weight, bias and softcap for the fused loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from fused_concept.training.config import DEFAULT_MODEL_NAME, ConfigError, TrainConfig, check_batches, model_name
from fused_concept.training.data import TokenData, heldout_chunks, split_train_heldout, token_chunks

LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
DEFAULT_MODEL_REFERENCE = "smollm2"  # how adapters record the embedded default model (--model accepts it)


def is_rank0() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def log(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` property when it wraps a model,
    which warns (FutureWarning) on every run; nothing a user can change, so that one warning is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


# ============================================================================= process group and device


@dataclass
class Run:
    """Where this process runs: its rank and world size, its device, whether it made the process group,
    and the autocast dtype of the model's forwards (bf16 on CUDA unless --no-bf16; None on a CPU)."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool
    autocast_dtype: Optional[torch.dtype]


def start_run(config: TrainConfig) -> Run:
    """Start the process group under torchrun (gloo on CPU, nccl on CUDA) and pick the device."""
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError("device", config.device, "CUDA is not available on this machine (use --device cpu)")
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
    return Run(rank, world, device, owns_group, autocast_dtype)


def autocast(run: Run):
    """The model forwards' autocast context: bf16 on CUDA (run.autocast_dtype), nothing on a CPU."""
    if run.autocast_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(run.device.type, dtype=run.autocast_dtype)


def end_run(run: Run, finished: bool) -> None:
    """Destroy the group this run made; after a finished run, first `wait_for_peers`."""
    if not run.owns_group:
        return
    if finished:
        wait_for_peers()
    dist.destroy_process_group()


def wait_for_peers() -> None:
    """A barrier, so that no rank tears the group down while a peer may still be in a collective (rank 0
    writes its outputs after the last one). A rare gloo abort at exit was once seen and never reproduced
    since (tests/training/stress_shutdown.py, `make stress`, also with `--no-wait`); its cause is unknown."""
    dist.barrier()


def micro_batches_per_step(config: TrainConfig, world: int) -> int:
    """Micro-batches per optimizer step on one rank."""
    check_batches(config, world)
    return config.batch_size // world // config.micro_batch_size


# ============================================================================= the model


def load_named_model(config: TrainConfig, **model_kw):
    """(model, tokenizer) that `config.model` names (default: SmolLM2-135M), named as the user named it;
    a model that cannot be loaded is a `ConfigError` naming --model and the loader's reason."""
    from fused_concept.integrations import hf

    log(f"loading model {config.model or DEFAULT_MODEL_NAME} ...")
    try:
        with contextlib.nullcontext() if config.progress else _no_loading_bars():
            model, tokenizer = (hf.load_default_model(**model_kw) if config.model is None
                                else hf.load_model(config.model, **model_kw))
    except (OSError, ValueError, ImportError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("model", config.model, f"cannot be loaded: {reason}") from exc
    # what peft writes into adapter_config.json (model.name_or_path) and the model card (config's): a
    # portable reference, not the folder the weights were read from (for the default, inside the virtualenv)
    model.name_or_path = model.config.name_or_path = model_reference(config.model)
    return model, tokenizer


def model_reference(model: Optional[str]) -> str:
    """How a run's adapters record their base model: `DEFAULT_MODEL_REFERENCE` (which --model accepts) for
    the embedded default, also when --model names its GGUF file; otherwise the --model value as given."""
    return DEFAULT_MODEL_REFERENCE if is_default_model(model) else model


def same_model(a: Optional[str], b: Optional[str]) -> bool:
    """Whether two model references name the same model: both the embedded default, or the same text."""
    return (is_default_model(a) and is_default_model(b)) or a == b


def is_default_model(reference: Optional[str]) -> bool:
    """Whether `reference` names the embedded SmolLM2 GGUF: none, default / smollm2, the name runs record
    for it, its file, or the package folder older runs recorded (a path inside the virtualenv)."""
    if reference is None or reference.strip().lower() in ("default", DEFAULT_MODEL_REFERENCE,
                                                            DEFAULT_MODEL_NAME.lower()):
        return True
    if not reference.strip():
        return False
    try:
        from fused_concept.integrations.hf import default_gguf_path

        gguf = os.path.realpath(default_gguf_path())
    except (ImportError, FileNotFoundError):
        return False
    return os.path.realpath(reference) in (gguf, os.path.dirname(gguf))


@contextlib.contextmanager
def _no_loading_bars():
    """--no-progress: transformers' weight-loading bar off, and the GGUF loader's own tqdm bar too (it is
    not behind transformers' switch); both restored afterwards."""
    import functools

    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_loader

    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    real_bar = getattr(gguf_loader, "tqdm", None)
    transformers.utils.logging.disable_progress_bar()
    if real_bar is not None:
        gguf_loader.tqdm = functools.partial(real_bar, disable=True)
    try:
        yield
    finally:
        if real_bar is not None:
            gguf_loader.tqdm = real_bar
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


def setup_model(config: TrainConfig, run: Run, model, tokenizer):
    """The given model, or the one `config.model` names (default: SmolLM2-135M), on the run's device."""
    if model is None:
        model_kw = four_bit_options(config, run)
        model, tokenizer = load_named_model(config, **model_kw)
        if model_kw:
            return model, tokenizer  # placed on the GPU by bitsandbytes
    return model.to(run.device), tokenizer


def four_bit_options(config: TrainConfig, run: Run) -> Dict:
    """from_pretrained options for the paper's NF4 base model, when asked for and possible (else none)."""
    if not config.load_in_4bit:
        return {}
    if run.device.type != "cuda" or config.model is None or importlib.util.find_spec("bitsandbytes") is None:
        log("load_in_4bit: needs CUDA, bitsandbytes and a --model that is not GGUF; loading full precision")
        return {}
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                               bnb_4bit_compute_dtype=torch.float16)
    return {"quantization_config": quant, "device_map": {"": run.device.index or 0}}


def check_adapters(adapters: Optional[str]) -> None:
    """`eval --adapters DIR`: DIR must be what peft's save_pretrained wrote (a run's adapters/)."""
    if adapters is not None and not os.path.isfile(os.path.join(adapters, "adapter_config.json")):
        reason = "no such folder" if not os.path.exists(adapters) else "holds no adapter_config.json"
        raise ConfigError("adapters", adapters, reason + " (pass the adapters/ folder a training run wrote)")


def recorded_base_model(adapters: str) -> Optional[str]:
    """The base model DIR/adapter_config.json records (`base_model_name_or_path`); None when it names none."""
    try:
        with open(os.path.join(adapters, "adapter_config.json"), encoding="utf-8") as handle:
            recorded = json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ConfigError("adapters", adapters, f"adapter_config.json cannot be read ({exc})") from None
    return recorded if isinstance(recorded, str) and recorded.strip() else None


def with_adapters_base_model(config: TrainConfig, adapters: Optional[str]) -> TrainConfig:
    """`eval --adapters DIR` without --model: the config with the base model DIR records, resolved as
    --model would be (the embedded default's reference: the default; a path: as the run was given it);
    `ConfigError` naming --adapters when it records none or one this machine lacks. --model given wins."""
    check_adapters(adapters)
    if adapters is None or config.model is not None:
        return config
    recorded = recorded_base_model(adapters)
    if recorded is None:
        raise ConfigError("adapters", adapters, "adapter_config.json names no base model; pass --model")
    if is_default_model(recorded):
        return config
    problem = model_name(recorded)
    if problem:
        raise ConfigError("adapters", adapters, f"its base model {recorded} (adapter_config.json): {problem}; "
                          "pass --model")
    return dataclasses.replace(config, model=recorded)


def load_adapters(model: nn.Module, adapters: str) -> nn.Module:
    from peft import PeftModel

    with quiet_peft():
        return PeftModel.from_pretrained(model, adapters)


# ============================================================================= the data


def setup_data(config: TrainConfig, run: Run, text: str, model, tokenizer) -> TokenData:
    """Tokenise, split train / held-out, and attach concept sets (built once by rank 0, cached)."""
    chunks = token_chunks(tokenizer, text, config.seq_len, bos=config.bos)
    train_ids, heldout_ids = split_train_heldout(chunks, config.num_train, config.num_heldout,
                                                 source=config.data or "the default corpus")
    train_concepts = concept_sets(config, run, model, tokenizer, "train", train_ids)
    heldout_concepts = concept_sets(config, run, model, tokenizer, "heldout", heldout_ids)
    return TokenData(train_ids, train_concepts, heldout_ids, heldout_concepts)


def heldout_part(config: TrainConfig, text: str, tokenizer) -> torch.Tensor:
    """The held-out sequences alone (the last `num_heldout` of the text), as training splits them."""
    chunks = token_chunks(tokenizer, text, config.seq_len, bos=config.bos)
    return heldout_chunks(chunks, config.num_heldout, source=config.data or "the default corpus")


def concept_sets(config: TrainConfig, run: Run, model, tokenizer, part: str, ids: torch.Tensor) -> torch.Tensor:
    """Concept sets of `ids` from the cache folder; rank 0 builds a missing file while the others wait."""
    from fused_concept.training.concepts import fingerprint, load_or_build_concepts

    build_kw = dict(top_k=config.top_k, max_synonyms=config.max_synonyms, threshold=config.threshold,
                    tagging=config.tagging, pos_check=config.pos_check)
    key = hashlib.sha256(ids.numpy().tobytes() + repr(sorted(build_kw.items())).encode()).hexdigest()[:12]
    path = os.path.join(config.concept_cache or config.out_dir,
                        f"concepts-{fingerprint(model, tokenizer)}-{part}-{key}.pt")
    if run.rank == 0:
        if not os.path.exists(path):
            log(f"building {part} concept sets (cached in {path}) ...")
        sets = load_or_build_concepts(path, model, tokenizer, ids, progress=config.progress, **build_kw)
    if run.world > 1:
        dist.barrier()
    if run.rank != 0:
        sets = load_or_build_concepts(path, model, tokenizer, ids, progress=False, **build_kw)
    return sets


# ============================================================================= what trains, and how


class Trunk(nn.Module):
    """The model WITHOUT its LM head: forward returns (final hidden states, head weight, head bias,
    softcap), which the fused loss takes instead of logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        from fused_concept.integrations.hf import hidden_and_head

        return hidden_and_head(self.model, input_ids, use_cache=False)


@dataclass
class Trainee:
    """What trains: `net` (the model, LoRA layers inside when used), its trainable parameters by name,
    `trunk` (the model without its head, or its DDP wrapper), `ddp` (that wrapper, under data
    parallelism), `vocab_parallel` (the head split over ranks) and `peft` (for save_pretrained)."""

    net: nn.Module
    trainable: Dict[str, nn.Parameter]
    trunk: nn.Module
    ddp: Optional[nn.parallel.DistributedDataParallel]
    vocab_parallel: bool
    peft: Optional[nn.Module] = None

    def no_sync(self, sync: bool):
        """DDP's gradient all-reduce only on the micro-batch where `sync` (the step's last)."""
        return contextlib.nullcontext() if sync or self.ddp is None else self.ddp.no_sync()


def setup_trainee(config: TrainConfig, run: Run, model: nn.Module) -> Trainee:
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
        with quiet_peft():
            peft_model = get_peft_model(model, lora)
        net = peft_model.get_base_model()  # LoRA layers now sit inside `model`
    if not getattr(net, "is_loaded_in_4bit", False):
        net.to(run.device)
    trainable = {name: p for name, p in net.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    trunk = Trunk(net)
    vocab_parallel = config.vocab_parallel and run.world > 1
    if config.vocab_parallel and not vocab_parallel:
        log("--vocab-parallel: one process, so the head is not split (the plain fused loss)")
    ddp = None
    if run.world > 1 and not vocab_parallel:
        ddp = nn.parallel.DistributedDataParallel(
            trunk, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    return Trainee(net, trainable, ddp if ddp is not None else trunk, ddp, vocab_parallel, peft_model)


def setup_optimizer(config: TrainConfig, trainee: Trainee):
    """AdamW over the trainable parameters, with `lr_factor`'s warm-up and cosine schedule."""
    optimizer = torch.optim.AdamW(list(trainee.trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    return optimizer, scheduler


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to `min_lr_ratio` at the last step."""
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

