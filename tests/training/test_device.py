"""Training on CUDA, tested on a CPU: the run picks the device and bf16 autocast, every tensor the training code
creates names its device, every model forward of training and evaluation runs under the run's autocast,
and a bf16-autocast run trains to the float64 objective within bf16 rounding. The whole pipeline on a GPU:
benchmarks/cuda_train_smoke.py (its --device cpu dry run is the last test here)."""
import copy
import json
import os
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fused_concept.training
from fused_concept.training import loop, run
from fused_concept.training.config import TrainConfig
from helpers.contract import contract_loss, paper_objective_weights
from helpers.tiny import VOCAB, small_config, tiny_data, tiny_model

TRAINING = os.path.dirname(os.path.abspath(fused_concept.training.__file__))
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor, torch.randperm,
             torch.randint, torch.rand, torch.randn, torch.linspace, torch.eye}


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch as if one CUDA device with bf16 were present (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)


def test_cuda_run_uses_the_local_rank_and_bf16_autocast(fake_cuda, monkeypatch):
    for device in ("cuda", "auto"):
        started = run.start_run(TrainConfig(device=device))
        assert started.device == torch.device("cuda", 0) and started.autocast_dtype == torch.bfloat16
        context = run.autocast(started)
        assert isinstance(context, torch.autocast)
        assert (context.device, context.fast_dtype) == ("cuda", torch.bfloat16)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert run.start_run(TrainConfig(device="cuda")).device == torch.device("cuda", 1)
    assert run.start_run(TrainConfig(device="cuda", bf16=False)).autocast_dtype is None
    assert run.start_run(TrainConfig(device="cpu")).autocast_dtype is None  # bf16 is for CUDA only


class _ImplicitDevices(TorchFunctionMode):
    """Records every tensor factory that code under fused_concept/training calls without a device."""

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(TRAINING):
                self.found.append(f"{os.path.relpath(caller, TRAINING)}:{sys._getframe(1).f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def test_every_tensor_the_training_code_creates_names_its_device(tmp_path):
    """On CUDA, a tensor made on the default device (the CPU) next to the run's tensors is the classic bug:
    every factory call of the training code (loop, evaluation, checkpoints, resume) says where it goes
    (the run's device, or the CPU on purpose for host-side indices and sums)."""
    config = small_config(tmp_path, steps=2, lora=True, checkpoint_every=1)
    with _ImplicitDevices() as mode:
        loop.train(config, model=tiny_model(), data=tiny_data())
        os.remove(tmp_path / "checkpoints" / "step-000002.pt")
        loop.train(TrainConfig(**{**config.__dict__, "resume": True}), model=tiny_model(), data=tiny_data())
    assert not mode.found, sorted(set(mode.found))


def test_bf16_autocast_run_wraps_every_forward_and_matches_float64(tmp_path, monkeypatch):
    """The CUDA run's autocast, entered on the CPU (which supports bf16 autocast): the trunk's forwards in
    training and evaluation all run under it, the loss outside it, and the first step's objective is the
    float64 objective of the same weights within bf16 rounding."""
    from fused_concept.integrations import hf

    seen, real = [], hf.hidden_and_head

    def spy(model, input_ids, **kw):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), input_ids.device))
        return real(model, input_ids, **kw)

    monkeypatch.setattr(hf, "hidden_and_head", spy)
    monkeypatch.setattr(loop, "start_run", lambda config: run.Run(0, 1, torch.device("cpu"), False, torch.bfloat16))
    model, data = tiny_model(), tiny_data()
    oracle = copy.deepcopy(model).double()
    result = loop.train(small_config(tmp_path, steps=2, lora=False), model=model, data=data)
    assert len(seen) == 2 * 2 + 2 and all(s == (True, torch.bfloat16, torch.device("cpu")) for s in seen), seen

    config = small_config(tmp_path)
    chosen = loop.step_sequences(0, config.batch_size, data.train_ids.shape[0], config.seed)
    ids, concepts = data.train_ids[chosen], data.train_concepts[chosen, 1:]
    with torch.no_grad():
        hidden = oracle.model(ids[:, :-1]).last_hidden_state
    want, _ = contract_loss(hidden, oracle.lm_head.weight, ids[:, 1:], concepts, margin=config.margin,
                            **paper_objective_weights(ids[:, 1:], concepts, config.lam))
    want = float(want.detach())
    assert result["history"][0]["loss"] == pytest.approx(want, rel=1e-3)
    assert result["history"][0]["loss"] != pytest.approx(want, rel=1e-6)  # bf16 did run
    assert oracle.lm_head.weight.shape[0] == VOCAB


def test_cuda_smoke_script_dry_run_on_cpu(tmp_path, capsys):
    """benchmarks/cuda_train_smoke.py, the GPU check of the whole pipeline, run with --device cpu."""
    from benchmarks import cuda_train_smoke

    summary = cuda_train_smoke.main(["--dry-run", "--out", str(tmp_path)])
    assert summary["ok"], summary["checks"]
    assert summary["device"] == "cpu" and set(summary["checks"]) >= {"loss finite", "eval reproduces the run",
                                                                     "no autocast"}
    assert (tmp_path / "smoke.json").exists() and "ok" in capsys.readouterr().out
    adapter_config = json.loads((tmp_path / "run" / "adapters" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tmp_path / "job" / "model")  # eval took it from there
    # the CUDA-only checks (bf16 autocast, the comparison with a CPU run of the same job), on copies of this run
    run = {"device": "cpu", "autocast": "bfloat16", **{key: summary[key] for key in ("history", "before", "after")}}
    compared = cuda_train_smoke._checks("cpu", run, None, run, True, bf16=True)
    assert all(compared.values()) and "bf16 autocast" in compared and any("cpu's" in name for name in compared)
    assert not cuda_train_smoke._checks("cpu", {**run, "autocast": None}, None, None, True, bf16=True)["bf16 autocast"]
