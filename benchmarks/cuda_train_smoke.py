"""The whole training pipeline once, on a tiny random Llama and a tiny corpus: `train` (concept sets built by
the model, evaluation before and after, LoRA steps with the fused loss, checkpoints, adapters) and then
`eval --adapters`, both through the command line, on the device asked for.

    .venv/bin/python -m benchmarks.cuda_train_smoke --out OUT              on a GPU: a few seconds
    .venv/bin/python -m benchmarks.cuda_train_smoke --dry-run --out OUT    on the CPU (tests run it)

On CUDA the run must have used bf16 autocast (unless the GPU lacks bf16), and the same job also runs on
the CPU (float32, no autocast): the first step's objective and the held-out perplexity before training
must agree within bf16 rounding. `--dry-run` is `--device cpu --no-cpu-compare`: every step but the
GPU, so the script itself is tested on machines without one. Parts whose packages are missing
(peft: LoRA and eval --adapters; gensim: word similarity; spaCy: the content-word tagger, replaced by
the stopword heuristic) are skipped or replaced and named in the summary. Writes OUT/smoke.json (the
summary: device, checks, seconds, metrics) and prints one line per check; exit status 1 when one fails.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import time

WORDS = ["<s>", "<unk>", "The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", ".", "ĠDogs", "Ġrun", "Ġquickly", ",",
         "Ġand", "'s", "Ġhouse", "Ġwas", "Ġgreen", "Ġdog", "Ġkitten", "Ġbig", "Ġtree"]
TEXT = ("The cat sat on the mat. Dogs run quickly, and the cat's house was green. The big dog sat on the tree. "
        * 16)


def write_tiny_job(folder: str, seed: int = 0):
    """A random 2-layer Llama and its word-level tokenizer saved in `folder`/model, the corpus in
    `folder`/corpus.txt; returns (model folder, corpus path)."""
    import tokenizers
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="<s>")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    model_dir, corpus = os.path.join(folder, "model"), os.path.join(folder, "corpus.txt")
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with open(corpus, "w") as handle:
        handle.write(TEXT)
    return model_dir, corpus


def _job_options(model_dir: str, corpus: str, cache: str, lora: bool, word_similarity: bool):
    """The options train and eval share; `--model` first (eval leaves it out)."""
    return ["--model", model_dir, "--data", corpus, "--seq-len", "12", "--num-heldout", "3", "--top-k", "8",
            "--concept-cache", cache, "--no-progress"] + ([] if word_similarity else ["--no-word-similarity"])


def _train(device: str, out: str, options, lora: bool, bf16: bool = False):
    from fused_concept.training.cli import main as cli

    start = time.time()
    cli(["train", "--device", device, "--out-dir", out, "--num-train", "4", "--steps", "3", "--batch-size", "2",
         "--micro-batch-size", "1", "--lr", "5e-2", "--checkpoint-every", "2", "--bf16" if bf16 else "--no-bf16"]
        + options + ([] if lora else ["--no-lora"]))
    with open(os.path.join(out, "metrics.json")) as handle:
        return json.load(handle), time.time() - start


def _close(a, b, rel):
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _checks(device, run, evaluated, cpu_run, lora, bf16=False):
    history, after = run["history"], run["after"]
    checks = {
        "runs on the device": run["device"].startswith(device),
        "bf16 autocast" if bf16 else "no autocast": run["autocast"] == ("bfloat16" if bf16 else None),
        "loss finite": all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history),
        "trained": len(history) == 3 and history[0]["loss"] != history[-1]["loss"],
        "concept sets built": after["heldout.content_tokens"] > 0,
    }
    if evaluated is not None:
        checks["eval reproduces the run"] = all(_close(evaluated[k], v, 1e-4) for k, v in after.items())
    if cpu_run is not None:  # bf16 autocast on the GPU against float32 on the CPU
        checks["step-1 objective = cpu's (bf16 rounding)"] = _close(history[0]["loss"], cpu_run["history"][0]["loss"],
                                                                   2e-2)
        checks["perplexity before = cpu's (bf16 rounding)"] = _close(
            run["before"]["heldout.perplexity"], cpu_run["before"]["heldout.perplexity"], 2e-2)
    return checks


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", default=None, help="output folder (default: a temporary one)")
    parser.add_argument("--no-cpu-compare", action="store_true", help="on CUDA, skip the CPU run of the same job")
    parser.add_argument("--dry-run", action="store_true", help="--device cpu --no-cpu-compare: check the script "
                        "on a machine without a GPU")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.device, args.no_cpu_compare = "cpu", True
    out = args.out or tempfile.mkdtemp(prefix="cuda-train-smoke-")
    os.makedirs(out, exist_ok=True)
    lora = importlib.util.find_spec("peft") is not None
    word_similarity = importlib.util.find_spec("gensim") is not None
    import torch

    bf16 = args.device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    start = time.time()
    model_dir, corpus = write_tiny_job(os.path.join(out, "job"))
    options = _job_options(model_dir, corpus, os.path.join(out, "concept-cache"), lora, word_similarity)
    run, train_s = _train(args.device, os.path.join(out, "run"), options, lora, bf16)
    evaluated, eval_s = None, 0.0
    if lora:  # without --model: on the base model the adapters record
        from fused_concept.training.cli import main as cli

        eval_start = time.time()
        cli(["eval", "--adapters", os.path.join(out, "run", "adapters"), "--out-dir", os.path.join(out, "eval"),
             "--device", args.device, "--bf16" if bf16 else "--no-bf16"] + options[2:])
        with open(os.path.join(out, "eval", "metrics.json")) as handle:
            evaluated, eval_s = json.load(handle)["metrics"], time.time() - eval_start
    cpu_run = None
    if args.device == "cuda" and not args.no_cpu_compare:
        cpu_run, _ = _train("cpu", os.path.join(out, "cpu-run"), options, lora)
    checks = _checks(args.device, run, evaluated, cpu_run, lora, bf16)
    summary = _summary(args.device, checks, run, evaluated, cpu_run, lora, word_similarity,
                       {"train": train_s, "eval": eval_s, "total": time.time() - start})
    with open(os.path.join(out, "smoke.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    for name, passed in checks.items():
        print(f"{'ok    ' if passed else 'FAILED'} {name}", flush=True)
    verdict = "ok" if summary["ok"] else "FAILED"
    print(f"{verdict}: {args.device}, {summary['seconds']['total']:.1f} s; {out}/smoke.json", flush=True)
    return summary


def _summary(device, checks, run, evaluated, cpu_run, lora, word_similarity, seconds) -> dict:
    import torch

    return {
        "ok": all(checks.values()),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "torch": torch.__version__,
        "checks": checks,
        "autocast": run["autocast"],
        "parts": {"lora_and_eval_adapters": lora, "word_similarity": word_similarity,
                  "content_words": run["content_words"]},
        "seconds": {name: round(value, 2) for name, value in seconds.items()},
        "run_seconds": run["seconds"],
        "history": run["history"],
        "before": run["before"],
        "after": run["after"],
        "eval": evaluated,
        "cpu_history": None if cpu_run is None else cpu_run["history"],
    }


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
