"""What a run saves of its weights: crash-safe checkpoints (resume) and the LoRA adapters in PEFT format.

The checkpoint format (``fused-concept-checkpoint/1``): one ``torch.save`` file per kept step,
``out_dir/checkpoints/step-NNNNNN.pt``, holding tensors and plain data only (`CHECKPOINT_FIELDS`: config
and history as dicts and lists, RNG states as tensors, optimizer and scheduler ``state_dict``s) and a
sha256 checksum of it all, so it loads with ``torch.load(weights_only=True)`` and cannot run code.
Written atomically (``durable.save_atomic``); `resume` skips a damaged newest file for the previous one.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from fused_concept.training.config import TRAJECTORY_FIELDS, ConfigError, TrainConfig
from fused_concept.training.durable import UnreadableFile, checksum, load_plain, matches, save_atomic
from fused_concept.training.run import Trainee, log

CHECKPOINT_FORMAT = "fused-concept-checkpoint/1"
# what a checkpoint holds besides its format and checksum
CHECKPOINT_FIELDS = ("step", "trainable", "optimizer", "scheduler", "rng_cpu", "rng_cuda", "history", "before",
                     "config")


@dataclass
class State:
    """What a checkpoint restores besides weights and optimizer: the next step, the per-step records
    so far, and the held-out metrics before training."""

    step: int = 0
    history: List[Dict] = field(default_factory=list)
    before: Optional[Dict] = None


def checkpoint_paths(out_dir: str) -> List[str]:
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step-*.pt")))


def resume_point(config: TrainConfig) -> Optional[Tuple[str, Dict]]:
    """With --resume, (path, content) of the newest intact checkpoint in out_dir, checked against
    `config` (`ConfigError` naming --resume when it was written with other trajectory settings); None
    when not resuming or when there is none. Read before any slow work, so that a mismatch is refused
    before the model loads; `resume` applies it once the model and the optimizer exist."""
    if not config.resume:
        return None
    found = checkpoint_paths(config.out_dir)
    if not found:
        log(f"--resume: no checkpoint in {config.out_dir}/checkpoints, starting from step 0")
        return None
    path, saved = newest_intact(found)
    check_resumable(saved["config"], config)
    return path, saved


def resume(point: Optional[Tuple[str, Dict]], trainee: Trainee, optimizer, scheduler) -> State:
    """The state to start from: fresh, or the checkpoint `resume_point` found, loaded into the weights,
    optimizer, scheduler and random number generators."""
    if point is None:
        return State()
    path, saved = point
    with torch.no_grad():
        for name, p in trainee.trainable.items():
            p.copy_(saved["trainable"][name])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng_cpu"])
    if saved["rng_cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    log(f"resumed from {path} at step {saved['step']}")
    return State(saved["step"], saved["history"], saved["before"])


def newest_intact(paths: List[str]) -> Tuple[str, Dict]:
    """(path, content) of the newest checkpoint that loads and verifies. A damaged one (truncated,
    garbled, checksum mismatch, another format) is skipped with a warning, so the run resumes from the
    previous kept one; one holding objects that weights_only refuses stops the run (someone else wrote
    it). ValueError naming every file when none is intact."""
    problems = []
    for path in reversed(paths):
        try:
            return path, load_checkpoint(path)
        except UnreadableFile as exc:
            if exc.refused:
                raise
            problems.append(str(exc))
            warnings.warn(f"--resume: {exc}; skipping it", stacklevel=2)
    raise ValueError("--resume: no checkpoint can be used: " + "; ".join(problems)
                     + ". Delete the checkpoints folder to start from step 0")


def load_checkpoint(path: str) -> Dict:
    """The content of a checkpoint file (`CHECKPOINT_FIELDS`), read with weights_only=True and checked
    against its checksum; `UnreadableFile` naming the file when it is damaged or refused."""
    saved = load_plain(path, "checkpoint")
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise UnreadableFile(f"checkpoint {path} is not a {CHECKPOINT_FORMAT} file (found {found!r})", refused=False)
    content = {name: saved.get(name) for name in CHECKPOINT_FIELDS}
    if not matches(content, saved.get("checksum")):
        raise UnreadableFile(f"checkpoint {path} is damaged: its checksum does not match its content", refused=False)
    return content


def check_resumable(saved: Dict, config: TrainConfig) -> None:
    """A resumed run must match its checkpoint on every setting that changes the trajectory."""
    mismatched = [f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
                  for name in TRAJECTORY_FIELDS if saved.get(name) != getattr(config, name)]
    if mismatched:
        raise ConfigError("resume", True, "the checkpoint was written with other settings; " + "; ".join(mismatched))


def save_checkpoint(config: TrainConfig, trainee: Trainee, optimizer, scheduler, state: State, keep=2) -> None:
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
    for old in checkpoint_paths(config.out_dir)[:-keep]:
        os.remove(old)


def save_adapters(config: TrainConfig, trainee: Trainee) -> None:
    """The trained LoRA adapters in PEFT format (`save_pretrained`) in out_dir/adapters, loadable with
    `peft.PeftModel.from_pretrained(base_model, path)` (and `python -m fused_concept eval --adapters`).
    adapter_config.json and the model card name the base model as `run.load_named_model` named it
    (`run.model_reference`: the --model value as given, or `smollm2` for the embedded default; never a
    path into the virtualenv), which `eval --adapters` without --model resolves. Only q/k/v/o adapters
    train, so the embedding layers are not saved (and peft need not look for the base model's config to
    decide that, which warned)."""
    if trainee.peft is not None:
        trainee.peft.save_pretrained(os.path.join(config.out_dir, "adapters"), save_embedding_layers=False)
