"""Measure what the backward's tile filter (filter_eps) costs in accuracy:

    python -m benchmarks.filter_accuracy          (CUDA, or Triton's interpreter on CPU)

A synthetic head with a Zipf-like unigram bias (b_v = -2 log(v + 1), so a few ids carry most of the
mass, as in trained LM heads) and Gaussian logits; plain cross-entropy gradient with coefficient 1/N.
Prints, per filter_eps, the fraction of 128 x 128 logit tiles whose every softmax probability is below
eps (the tiles the filter drops) and the relative Frobenius error of d_hidden and d_weight against a
float64 evaluation of the unfiltered gradient. On the interpreter the backward runs with the GPU's
128 x 128 tiles so the dropped tiles are the same ones a GPU would drop.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_concept.kernels import configs  # noqa: E402
from fused_concept._inputs import Canonical  # noqa: E402
from fused_concept._rowmath import Needs, RowGrad  # noqa: E402
from fused_concept._triton_path import triton_shard_grads  # noqa: E402


def main(n=128, v=8192, d=64, scale=2.0, eps_list=(0.0, 2.0 ** -20, 2.0 ** -16, 2.0 ** -12), seed=0):
    if configs.interpreting():
        gpu_like = configs.LaunchConfig("gpu-like", {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_D": 64,
                                                     "GROUP": 8}, 4, 1)
        for name in ("dense_grad_h", "dense_grad_w", "dense_grad_chunk"):
            configs._INTERPRETER[name] = gpu_like
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(v, d, generator=g) * scale / d ** 0.5
    b = -2.0 * torch.log(torch.arange(1, v + 1).float())
    y = torch.randint(0, 50, (n,), generator=g)
    z = h.double() @ w.double().t() + b.double()
    lse = torch.logsumexp(z, 1)
    prob = torch.exp(z - lse[:, None])
    dz = prob / n
    dz[torch.arange(n), y] -= 1.0 / n
    want_dh, want_dw = dz @ w.double(), dz.t() @ h.double()
    m_pad, v_pad = -(-n // 128) * 128, -(-v // 128) * 128
    padded = torch.zeros(m_pad, v_pad, dtype=torch.float64)
    padded[:n, :v] = prob
    tile_max = padded.reshape(m_pad // 128, 128, v_pad // 128, 128).amax(dim=(1, 3))
    coef = torch.full((n,), 1.0 / n)
    to = lambda t: t.to(dev)  # noqa: E731
    for eps in eps_list:
        ones = to(torch.ones(n))
        canon = Canonical(hidden=to(h), weight=to(w), bias=to(b), targets=to(y), valid=ones.bool(),
                          set_ids=to(torch.full((n, 0), -1, dtype=torch.long)), has_set=~ones.bool(), soft_ids=None,
                          soft_weights=None, alpha=ones, beta=ones, lead_shape=torch.Size([n]))
        grad = RowGrad(lse=to(lse.float()), set_lse=to(torch.full((n,), float("-inf"))), coef_dense=to(coef),
                       coef_target=to(coef), coef_set=to(torch.zeros(n)))
        dh, dw, _ = triton_shard_grads(canon, grad, Needs(True, True, False), filter_eps=eps)
        rel = lambda a, e: float((a.double().cpu() - e).norm() / e.norm())  # noqa: E731
        dropped = float((tile_max < eps).double().mean())
        print(f"filter_eps={eps:.3g}  tiles_dropped={dropped:.3f}  rel_err_d_hidden={rel(dh, want_dh):.2e}  "
              f"rel_err_d_weight={rel(dw, want_dw):.2e}", flush=True)


if __name__ == "__main__":
    main()
