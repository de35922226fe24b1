"""The reference training loop on a tiny random-weight Llama with hand-made concept sets.

Oracle: the same training written with explicit float64 logits and the paper's objective evaluated
from the contract's formulas (no fused code), the same AdamW / schedule / clipping.
"""
import copy
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from fused_concept.training.cli import build_parser, main
from fused_concept.training.data import DataError, default_corpus_text, load_text, split_train_heldout
from fused_concept.training.config import TrainConfig
from fused_concept.training.loop import step_sequences, train
from fused_concept.training.run import lr_factor
from helpers.tiny import SEQ, VOCAB, small_config, tiny_data, tiny_model

def paper_objective_f64(logits, targets, concepts, lam, margin):
    """The contract's objective from explicit float64 logits [N, V]; every row is valid here."""
    lse = torch.logsumexp(logits, dim=1)
    ce = lse - logits.gather(1, targets[:, None])[:, 0]
    content = (concepts != -1).any(dim=1)
    cl = []
    for i in range(logits.shape[0]):
        members = sorted({int(t) for t in concepts[i] if int(t) != -1} | {int(targets[i])})
        set_lse = torch.logsumexp(logits[i, members], 0)
        mass = float(torch.exp(set_lse - lse[i]).detach())
        cl.append((lse[i] - set_lse) * float(mass < margin))
    cl = torch.stack(cl)
    n_valid, n_content = logits.shape[0], int(content.sum())
    ntp = (ce[~content].sum() + (1 - lam) * ce[content].sum()) / n_valid
    return ntp + lam * cl[content].sum() / max(n_content, 1)


def test_three_steps_match_float64_explicit_logits_training(tmp_path):
    config = small_config(tmp_path, lora=False, steps=3)
    data = tiny_data()
    model = tiny_model()
    oracle = copy.deepcopy(model).double()
    result = train(config, model=model, data=data)

    # oracle: the same three steps, full fine-tuning, float64, explicit logits
    params = [p for p in oracle.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    for step in range(3):
        chosen = step_sequences(step, config.batch_size, data.train_ids.shape[0], config.seed)
        ids = data.train_ids[chosen]
        logits = oracle(ids[:, :-1]).logits.reshape(-1, VOCAB)
        loss = paper_objective_f64(logits, ids[:, 1:].reshape(-1), data.train_concepts[chosen, 1:].reshape(-1, 3),
                                   config.lam, config.margin)
        optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        scheduler.step()
        assert result["history"][step]["loss"] == pytest.approx(float(loss.detach()), rel=2e-4), step
        # Adam hides a constant gradient scale; the pre-clip norm does not
        assert result["history"][step]["grad_norm"] == pytest.approx(float(grad_norm), rel=2e-3), step
    assert result["history"][0]["loss"] != pytest.approx(result["history"][2]["loss"], rel=1e-3)  # it trained
    for trained, want in zip(model.parameters(), oracle.parameters()):
        torch.testing.assert_close(trained.detach().double(), want.detach(), rtol=2e-3, atol=2e-4)

    # outputs: metrics.json with both evaluations, checkpoints written atomically (no temp files left)
    with open(tmp_path / "metrics.json") as handle:
        saved = json.load(handle)
    assert saved["before"]["heldout.tokens"] == 4 * (SEQ - 1) and len(saved["history"]) == 3
    assert [os.path.basename(p) for p in sorted(glob.glob(str(tmp_path / "checkpoints" / "*")))] == [
        "step-000002.pt", "step-000003.pt"]
    assert not glob.glob(str(tmp_path / "**" / "*.tmp-*"), recursive=True)


def test_token_normalisation_independent_of_micro_batching(tmp_path):
    data = tiny_data()
    runs = [train(small_config(tmp_path / str(mb), micro_batch_size=mb, steps=2), model=tiny_model(), data=data)
            for mb in (1, 4)]
    for one, four in zip(runs[0]["history"], runs[1]["history"]):
        for key in ("loss", "ce", "mass", "grad_norm"):
            assert one[key] == pytest.approx(four[key], rel=1e-5), key
    assert runs[0]["after"]["heldout.perplexity"] == pytest.approx(runs[1]["after"]["heldout.perplexity"], rel=1e-5)


def test_resume_reproduces_uninterrupted_run(tmp_path):
    data = tiny_data()
    config = small_config(tmp_path, lora=True, lr=5e-2, plot=True, lora_dropout=0.2)  # restored RNG: same masks
    whole = train(config, model=tiny_model(), data=data)
    assert (tmp_path / "curves.png").stat().st_size > 1000
    # "interrupt" after step 2: drop the last checkpoint, then resume with a freshly loaded model
    os.remove(tmp_path / "checkpoints" / "step-000003.pt")
    resumed_model = tiny_model()
    resumed = train(TrainConfig(**{**config.__dict__, "resume": True}), model=resumed_model, data=data)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    assert resumed["after"] == whole["after"]
    assert resumed["history"][0]["loss"] != resumed["history"][2]["loss"]
    # a resume with other trajectory settings is refused, naming them
    with pytest.raises(ValueError, match="lam"):
        train(TrainConfig(**{**config.__dict__, "resume": True, "lam": 0.0}), model=tiny_model(), data=data)


_TORCHRUN_SCRIPT = """
import gc, json, sys, torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from helpers.tiny import tiny_model, tiny_data, small_config
from fused_concept.training.loop import train
dist.init_process_group("gloo")
out = {{}}
for name, extra in (("ddp", {{}}), ("vocab_parallel", {{"vocab_parallel": True}})):
    config = small_config({out!r} + "/" + name, micro_batch_size=1, lora=False, **extra)
    out[name] = train(config, model=tiny_model(), data=tiny_data())["history"]
if dist.get_rank() == 0:
    with open({out!r} + "/histories.json", "w") as handle:
        json.dump(out, handle)
gc.collect()
dist.barrier()
dist.destroy_process_group()
"""


def test_two_processes_match_one_process(tmp_path):
    single = train(small_config(tmp_path / "single", lora=False), model=tiny_model(), data=tiny_data())["history"]
    script = tmp_path / "run.py"
    script.write_text(_TORCHRUN_SCRIPT.format(tests=os.path.dirname(os.path.dirname(__file__)), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    histories = json.loads((tmp_path / "histories.json").read_text())
    for name in ("ddp", "vocab_parallel"):
        for one, two in zip(single, histories[name]):
            for key in ("loss", "ce", "mass", "grad_norm"):
                assert two[key] == pytest.approx(one[key], rel=1e-5), (name, key, one["step"])
    # only rank 0 wrote outputs; both runs wrote them
    assert (tmp_path / "ddp" / "metrics.json").exists() and (tmp_path / "vocab_parallel" / "metrics.json").exists()


# ----------------------------------------------------------------------------- data and CLI errors


def test_cli_bad_data_path_gives_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope.txt"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(missing), "--out-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "file not found" in err
    assert not (tmp_path / "out").exists()


def test_cli_options_map_to_config_fields():
    args = vars(build_parser().parse_args(["train", "--lam", "0", "--margin", "none", "--no-lora", "--steps", "5",
                                           "--data", "corpus.txt"]))
    args.pop("command"), args.pop("recipe")
    config = TrainConfig(**args)
    assert (config.lam, config.margin, config.lora, config.steps, config.data) == (0.0, None, False, 5, "corpus.txt")
    assert config.top_k == TrainConfig().top_k and config.out_dir == "runs/default"


@pytest.mark.parametrize("name, content, message", [
    ("dir", None, "is a directory"),
    ("notes.csv", "a,b\n", "unsupported file type"),
    ("empty.txt", "  \n", "contains no text"),
    ("broken.jsonl", '{"text": "fine"}\n{oops\n', "line 2 is not valid JSON"),
    ("notext.jsonl", '{"body": "x"}\n', 'line 1 has no string "text" field'),
])
def test_bad_data_files_name_the_problem(tmp_path, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_text(str(path))


def test_text_and_jsonl_files_are_read(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text here.")
    (tmp_path / "b.jsonl").write_text('{"text": "first line"}\n\n{"text": "second"}\n')
    assert load_text(str(tmp_path / "a.txt")) == "Plain text here."
    assert load_text(str(tmp_path / "b.jsonl")) == "first line\nsecond"


def test_default_corpus_is_english_prose_and_deterministic():
    text = default_corpus_text()
    assert text == default_corpus_text()
    assert len(text) > 100_000
    lines = text.split("\n")
    assert all(len(line.split()) >= 12 and not line.startswith(" ") for line in lines)
    assert text.count(" the ") > 2000


def test_too_short_corpus_names_the_sizes():
    with pytest.raises(DataError, match="fewer than the 8 training"):
        split_train_heldout(torch.zeros(5, 4, dtype=torch.long), 8, 2, source="tiny.txt")


# ----------------------------------------------------------------------------- recipe, adapters, sweep


def test_paper_recipe_and_departures():
    from fused_concept.training.config import resolve_schedule
    from fused_concept.training.recipes import PAPER_SETTINGS, departures

    paper = TrainConfig.paper(num_train=24)
    assert departures(paper) == [] and paper.lr == 7e-5 and paper.lora_dropout == 0.2 and paper.seq_len == 256
    resolved = resolve_schedule(paper)
    assert (resolved.steps, resolved.warmup_steps) == (8, 1)  # ceil(5 * 24 / 16), ceil(0.08 * 8)
    default = departures(TrainConfig())
    assert "lr=0.002 (paper 7e-05)" in default and not any(d.startswith("top_k") for d in default)
    assert set(PAPER_SETTINGS) <= {f for f in TrainConfig.__dataclass_fields__}
    from fused_concept.training.cli import _config

    _, config = _config(build_parser(), ["train", "--recipe", "paper", "--lr", "1e-4", "--steps", "3"])
    assert config.lr == 1e-4 and config.weight_decay == 0.05 and config.epochs == 5 and config.seq_len == 256


# peft's own warning when another tool loads the adapters (the application filters it: run.quiet_peft)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_adapters_saved_in_peft_format(tmp_path):
    from peft import PeftModel

    model = tiny_model()
    train(small_config(tmp_path, lora=True, lr=5e-2, steps=2), model=model, data=tiny_data())
    loaded = PeftModel.from_pretrained(tiny_model(), str(tmp_path / "adapters")).eval()
    ids = tiny_data().heldout_ids
    with torch.no_grad():
        want, got = model.eval()(ids).logits, loaded(ids).logits
        plain = tiny_model()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the adapters changed the model


def test_sweep_table_plot_and_paired_intervals(tmp_path):
    from fused_concept.training.sweep import sweep

    config = small_config(tmp_path, steps=2, lora=False, load_in_4bit=True)  # a sweep copies one model: never 4-bit
    summary = sweep(config, [0.0, 0.5], str(tmp_path / "sweep"), model=tiny_model(), tokenizer=None, data=tiny_data())
    recorded = json.loads((tmp_path / "sweep" / "lam-0.5" / "metrics.json").read_text())
    assert recorded["config"]["load_in_4bit"] is False and "load_in_4bit=False (paper True)" in recorded["notes"]
    for name in ("sweep.json", "sweep.md", "sweep.png"):
        assert (tmp_path / "sweep" / name).stat().st_size > 100
    twin, run = summary["runs"]["0"], summary["runs"]["0.5"]
    key = "heldout.content_perplexity"
    assert twin["diff_vs_twin"][key] == {"diff": 0.0, "ci95": [0.0, 0.0]}
    diff = run["diff_vs_twin"][key]
    assert diff["diff"] == pytest.approx(run["after"][key] - twin["after"][key], rel=1e-6)
    assert diff["ci95"][0] <= diff["diff"] <= diff["ci95"][1] and diff["diff"] != 0
    assert "| 0.5 |" in (tmp_path / "sweep" / "sweep.md").read_text()


def test_eval_command_reproduces_the_run_from_its_adapters(tmp_path):
    """`python -m fused_concept eval --adapters RUN/adapters` on the model and data a run used gives the
    run's own after-training metrics (same held-out rows, concept sets from the shared cache)."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<unk>", "The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "ĠDogs", "Ġrun", "Ġquickly", ",",
             "Ġand", "'s", "Ġhouse", "Ġwas", "Ġgreen", "Ġdog", "Ġkitten", "Ġbig", "Ġtree"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<s>")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "corpus.txt").write_text(" ".join(["The cat sat on the mat. Dogs run quickly, and the cat's house "
                                                  "was green. The big dog sat on the tree."] * 12))
    config = TrainConfig(model=str(tmp_path / "model"), data=str(tmp_path / "corpus.txt"), seq_len=12, num_train=4,
                         num_heldout=3, steps=3, batch_size=2, micro_batch_size=2, lr=5e-2, top_k=8,
                         word_similarity=False, progress=False, plot=False, out_dir=str(tmp_path / "run"),
                         concept_cache=str(tmp_path / "cache"))
    trained = train(config)
    assert trained["after"]["heldout.content_tokens"] > 0 and trained["data"]["seq_len"] == 12
    evaluated = main(["eval", "--adapters", str(tmp_path / "run" / "adapters"),
                      "--out-dir", str(tmp_path / "eval"), "--model", config.model, "--data", config.data,
                      "--seq-len", "12", "--num-heldout", "3", "--top-k", "8", "--no-word-similarity", "--no-progress",
                      "--concept-cache", config.concept_cache])
    assert evaluated == 0
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]
    for key, value in trained["after"].items():
        assert saved[key] == pytest.approx(value, rel=1e-5), key
    assert saved["heldout.perplexity"] != pytest.approx(trained["before"]["heldout.perplexity"], rel=1e-3)
