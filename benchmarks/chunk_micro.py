"""The per-chunk pieces of Triton's strategy "rows", timed alone (the GPU suite runs this through
`benchmarks.run`, into results.json's "chunk_micro"; alone: `python -m benchmarks.chunk_micro --device cuda`).

At the Llama-3-8B head (D = 4096, V = 128256, bf16) for C in (512, 1024, 2048) rows per chunk:

    logits      z = h_c W^T      [C, D] x [D, V] -> bf16 [C, V]      torch.mm(out=)
    d_hidden    dz W             [C, V] x [V, D] -> bf16 [C, D]      torch.mm(out=)
    d_weight    dW += dz^T h_c   [V, C] x [C, D], beta = 1, into bf16 (addmm_) and into float32
                                 (out_dtype=float32: the default accumulator for a 16-bit weight)
    kernel      `_chunk_rows_kernel` alone, K = 11: FUSED (the forward: two reads and one write of the
                C x V bf16 logits) and GIVEN (the recomputing backward: one read, one write)
    copy        a C x V bf16 copy_ (one read, one write): the memory rate the kernel is measured against

Each piece: median of `repeats` timed runs after 3 warm-ups (CUDA events; on the CPU synchronised
perf_counter), TFLOP/s for the products, GB/s (bytes the piece must move / time) for the kernel and the copy.
--dry (the suite's dry run): C in (16, 32), D = 32, V = 512, Triton's interpreter, one repeat.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

LLAMA = dict(d=4096, v=128256, k=11, rows=(512, 1024, 2048))
DRY = dict(d=32, v=512, k=11, rows=(16, 32))


def _timer(device):
    """fn, repeats -> median seconds of `repeats` calls after 3 warm-ups."""
    def time_it(fn, repeats):
        times = []
        for r in range(3 + repeats):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            if r >= 3:
                times.append(elapsed)
        return statistics.median(times)
    return time_it


def _kernel_launch(h, w, y, c, z, fused: bool):
    """A closure launching `_chunk_rows_kernel` once over z (FUSED or GIVEN), on canonical inputs of h, w."""
    from fused_concept.backends import triton_rows
    from fused_concept.core.inputs import prepare
    from fused_concept.kernels import configs

    canon = prepare(h, w, y, c)
    n = canon.num_rows
    cfg = configs.choose("chunk_rows", h.dtype, h.device)
    ids = triton_rows._id_table(canon)
    f32 = dict(dtype=torch.float32, device=h.device)
    if fused:
        stats = triton_rows._stats_buffers(canon)
        args = dict(g_ptr=torch.full((n,), 1.0 / n, **f32), alpha_ptr=canon.ntp_weight, beta_ptr=canon.concept_weight,
                    max_ptr=stats.max, arg_ptr=stats.argmax, lse_ptr=stats.lse, target_ptr=stats.target_logit,
                    set_lse_ptr=stats.set_lse, soft_dot_ptr=stats.soft_dot, zsum_ptr=None)
        return lambda: triton_rows._launch(z, canon, ids, 0, n, cfg, fused=args)
    ones = torch.ones(n, **f32)
    args = dict(lse_ptr=ones * 12.0, set_lse_ptr=ones * 3.0, coef_dense_ptr=ones / n, coef_target_ptr=ones / n,
                coef_set_ptr=ones / n, uni_ptr=None)
    return lambda: triton_rows._launch(z, canon, ids, 0, n, cfg, given=args)


def _products(h, w, z, dz, time_it, repeats):
    """[(piece, seconds, flops)] of the three products at this chunk."""
    rows, d = h.shape
    v = w.shape[0]
    flops = 2.0 * rows * d * v
    dh = torch.empty(rows, d, dtype=h.dtype, device=h.device)
    dw16 = torch.zeros(v, d, dtype=h.dtype, device=h.device)
    out = [("logits", time_it(lambda: torch.mm(h, w.t(), out=z), repeats), flops),
           ("d_hidden", time_it(lambda: torch.mm(dz, w, out=dh), repeats), flops),
           ("d_weight bf16 beta=1", time_it(lambda: dw16.addmm_(dz.t(), h), repeats), flops)]
    del dw16
    dw32 = torch.zeros(v, d, dtype=torch.float32, device=h.device)
    try:
        out.append(("d_weight fp32 beta=1", time_it(lambda: torch.addmm(dw32, dz.t(), h, out_dtype=torch.float32,
                                                                         out=dw32), repeats), flops))
    except (RuntimeError, TypeError) as exc:  # no aten::addmm.dtype_out here (CPU)
        out.append(("d_weight fp32 beta=1", None, flops, f"{type(exc).__name__}: {str(exc)[:80]}"))
    return out


def run(device: str, dry: bool = False, repeats: int = 10) -> dict:
    """{"shape", "rows": [{"chunk_rows", "pieces": [{"piece", "median_s", "tflops" | "gb_s"}]}]}."""
    from benchmarks._impls import make_inputs

    shape = DRY if dry else LLAMA
    repeats = 1 if dry else repeats
    d, v, k = shape["d"], shape["v"], shape["k"]
    time_it = _timer(device)
    _, w, _, _ = make_inputs(1, d, v, 0, torch.bfloat16, device, seed=0)
    result = {"shape": dict(d=d, v=v, k=k, dtype="bfloat16"), "repeats": repeats, "rows": []}
    for rows in shape["rows"]:
        h, _, y, c = make_inputs(rows, d, 1, 0, torch.bfloat16, device, seed=rows)
        y = torch.randint(0, v, (rows,), device=device)
        c = torch.randint(0, v, (rows, k), device=device)
        z = torch.empty(rows, v, dtype=torch.bfloat16, device=device)
        torch.mm(h, w.t(), out=z)
        dz = z.clone()
        pieces = []
        for piece in _products(h, w, z, dz, time_it, repeats):
            name, seconds, flops = piece[:3]
            pieces.append(dict(piece=name, median_s=seconds, tflops=None if seconds is None else flops / seconds / 1e12,
                               **({"note": piece[3]} if len(piece) > 3 else {})))
        chunk_bytes = rows * v * 2
        for name, fused, passes in (("kernel FUSED", True, 3), ("kernel GIVEN", False, 2)):
            seconds = time_it(_kernel_launch(h, w, y, c, z, fused), repeats)
            pieces.append(dict(piece=name, median_s=seconds, gb_s=passes * chunk_bytes / seconds / 1e9))
        seconds = time_it(lambda: dz.copy_(z), repeats)
        pieces.append(dict(piece="copy", median_s=seconds, gb_s=2 * chunk_bytes / seconds / 1e9))
        result["rows"].append({"chunk_rows": rows, "pieces": pieces})
        del z, dz
    return result


def lines(result: dict) -> list:
    """The table the suite's summary prints."""
    s = result["shape"]
    out = [f"strategy rows, per chunk (D={s['d']}, V={s['v']}, K={s['k']}, {s['dtype']}, "
           f"median of {result['repeats']}):"]
    for row in result["rows"]:
        parts = []
        for p in row["pieces"]:
            if p["median_s"] is None:
                parts.append(f"{p['piece']} n/a")
            elif "gb_s" in p:
                parts.append(f"{p['piece']} {p['median_s'] * 1e3:.3f} ms {p['gb_s']:.0f} GB/s")
            else:
                parts.append(f"{p['piece']} {p['median_s'] * 1e3:.3f} ms {p['tflops']:.1f} TFLOP/s")
        out.append(f"  C={row['chunk_rows']}: " + "; ".join(parts))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chunk_micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), required=True)
    parser.add_argument("--dry", action="store_true", help="tiny shapes (CPU: the Triton interpreter)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    result = run(args.device, dry=args.dry, repeats=args.repeats)
    print("\n".join(lines(result)))
    json.dump(result, sys.stdout, indent=1)
    return result


if __name__ == "__main__":
    main()
