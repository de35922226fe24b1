"""Concept-building speed: content words per second, the per-position scorer against the batched one.

    python -m benchmarks.concept_building [--sequences 4] [--repeats 3] [--threads 1 2] [--out FILE.json]

On the first ``--sequences`` sequences of the default job (SmolLM2-135M, default corpus, 64 tokens with
BOS, the paper's content words), side by side in one process, median of ``--repeats``:

* ``per-position``: what the builder did before, one batched forward per content word of its
  candidates (length-1 steps on a shared view of the prefix's key/value cache), at top-20 and top-100;
* ``batched``: :func:`fused_concept._candidate_scoring.score_sequence`, all candidates of a sequence in
  one forward with a 4-D mask, at top-100;
* ``build``: the whole :func:`fused_concept.training.concepts.build_concept_sets` at top-100 with the POS check.

Words per second count content words; candidates per second the scored (word, candidate) pairs. Both
are given per wall-clock second and per CPU second of this process (``time.process_time``): with one
thread, CPU seconds stand for the wall time of a quiet machine when the machine is shared. Compare the
rows of one run (they interleave per repeat), not absolute numbers across runs.
:func:`per_position_cosines` is also the reference the tests compare the batched scorer with.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _shared_prefix_cache(full_cache, t: int):
    """A cache holding positions 0..t-1 of ``full_cache`` (batch 1), shared (expanded, not copied) by a batch."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class _SharedPrefixLayer(DynamicLayer):
        def __init__(self, keys, values):
            super().__init__()
            self.keys, self.values = keys, values
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            n = key_states.shape[0]
            return (torch.cat([self.keys.expand(n, -1, -1, -1), key_states], dim=-2),
                    torch.cat([self.values.expand(n, -1, -1, -1), value_states], dim=-2))

    cache = DynamicCache()
    cache.layers = [_SharedPrefixLayer(layer.keys[:, :, :t], layer.values[:, :, :t]) for layer in full_cache.layers]
    return cache


@torch.no_grad()
def per_position_cosines(base, seq, full, positions, candidates):
    """The previous builder's scoring: per content position, one forward of its candidates as a batch of
    one-token steps on the prefix ``seq[:t]``'s cache. Same output as ``score_sequence``."""
    out = []
    reference = full.last_hidden_state[0]
    for t, cand in zip(positions, candidates):
        if cand.numel() == 0:
            out.append(torch.zeros(0))
            continue
        cache = _shared_prefix_cache(full.past_key_values, t)
        hidden = base(input_ids=cand[:, None], past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        out.append(torch.nn.functional.cosine_similarity(hidden.to(dtype), reference[t].to(dtype)[None], dim=-1))
    return out


def _workload(model, tokenizer, sequences: int, top_k: int):
    """Per sequence: (seq, full forward, content positions, candidate ids) as the builder makes them."""
    from fused_concept.training.concepts.content_words import vocab_of
    from fused_concept.training.data import load_text, token_chunks
    from fused_concept.integrations.hf.model_head import base_model, model_head
    from fused_concept.training.concepts import content_word_mask
    from fused_concept.training.concepts.build import _candidates

    base, head = base_model(model), model_head(model)
    ids = token_chunks(tokenizer, load_text(None), 64)[:sequences]
    mask = content_word_mask(tokenizer, ids)
    mask[:, 0] = False
    vocab = vocab_of(tokenizer, head.weight.shape[0])
    work = []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            rows = torch.nonzero(mask[b]).reshape(-1).tolist()
            full = base(input_ids=ids[b][None], use_cache=True)
            logits = head.logits(full.last_hidden_state[0, torch.tensor(rows) - 1])
            work.append((ids[b], full, rows, _candidates(vocab, logits, ids[b], rows, top_k)))
    return ids, mask, work


def _time(fn):
    """(wall seconds, CPU seconds of this process) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None):
    from fused_concept.training import concepts as concepts
    from fused_concept.integrations import hf as hf
    from fused_concept.training.concepts.scoring import score_sequence
    from fused_concept.integrations.hf.model_head import base_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)

    model, tokenizer = hf.load_default_model()
    base = base_model(model)
    ids, mask, work100 = _workload(model, tokenizer, args.sequences, 100)
    _, _, work20 = _workload(model, tokenizer, args.sequences, 20)
    words = int(mask.sum())
    cands = {k: sum(int(c.numel()) for w in work for c in w[3]) for k, work in (("20", work20), ("100", work100))}

    def scorer(fn, work):
        return lambda: [fn(base, seq, full, rows, cand) for seq, full, rows, cand in work]

    cases = {
        "per-position top-20": (scorer(per_position_cosines, work20), cands["20"]),
        "per-position top-100": (scorer(per_position_cosines, work100), cands["100"]),
        "batched top-100": (scorer(score_sequence, work100), cands["100"]),
        "build top-100 + POS check": (lambda: concepts.build_concept_sets(model, tokenizer, ids, content_mask=mask),
                                      cands["100"]),
    }
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        seconds = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (fn, _) in cases.items():
                seconds[name].append(_time(fn))
        for name, (_, n_cand) in cases.items():
            wall = statistics.median(s for s, _ in seconds[name])
            cpu = statistics.median(c for _, c in seconds[name])
            results.append({"case": name, "threads": threads, "seconds": wall, "cpu_seconds": cpu,
                            "words_per_s": words / wall, "candidates_per_s": n_cand / wall,
                            "words_per_cpu_s": words / cpu, "candidates_per_cpu_s": n_cand / cpu,
                            "repeats": seconds[name]})
    base = next(r for r in results if r["case"] == "per-position top-20")
    print(f"{words} content words in {args.sequences} sequences; candidates per word: top-20 "
          f"{cands['20'] / words:.1f}, top-100 {cands['100'] / words:.1f}")
    print("| case | threads | words/s | candidates/s | words/CPU-s | candidates/CPU-s | words/s vs per-position "
          "top-20 (wall, CPU) |\n|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['threads']} | {r['words_per_s']:.2f} | {r['candidates_per_s']:.0f} | "
              f"{r['words_per_cpu_s']:.2f} | {r['candidates_per_cpu_s']:.0f} | "
              f"{r['words_per_s'] / base['words_per_s']:.2f}x, {r['words_per_cpu_s'] / base['words_per_cpu_s']:.2f}x |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"words": words, "candidates": cands, "results": results}, handle, indent=2)


if __name__ == "__main__":
    main()
