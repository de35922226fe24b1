"""impl="reference": the naive loss. It materialises the float32 logits [N, V] and lets autograd do
the rest, so it is simple enough to trust and serves as the baseline the fused paths are measured
against. Same canonical inputs and row math as every other implementation."""
from __future__ import annotations

import torch

from fused_concept.core.inputs import Canonical
from fused_concept.core.rowmath import ShardStats, acc_dtype, nonfinite_rows, row_terms


def reference_rows(canon: Canonical):
    softcap = canon.softcap
    acc = acc_dtype(canon.hidden)
    z = canon.hidden.to(acc) @ canon.weight.to(acc).t()
    if canon.bias is not None:
        z = z + canon.bias.to(acc)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    # the non-finite policy (docs/math.md): rows hit by a NaN / inf input get NaN logits, hence a NaN loss
    # and a NaN gradient (multiplying, not replacing, so that autograd carries the NaN back)
    poison = torch.where(nonfinite_rows(canon), float("nan"), 1.0).to(acc)
    z = z * poison[:, None]
    best, arg = z.detach().max(dim=1)
    # written out (not torch.logsumexp) so that +inf logits give NaN, as torch's cross_entropy does
    lse = best + torch.log(torch.exp(z - best[:, None]).sum(dim=1))
    target_logit = z.gather(1, canon.targets.clamp(min=0)[:, None]).squeeze(1)
    target_logit = torch.where(canon.valid, target_logit, torch.zeros_like(lse))

    # membership mask of the concept set; pads go to an extra column that is dropped
    v = z.shape[1]
    in_set = torch.zeros(z.shape[0], v + 1, dtype=torch.bool, device=z.device)
    in_set.scatter_(1, torch.where(canon.set_ids >= 0, canon.set_ids, v), True)
    in_set = in_set[:, :v]
    # rows without a set get their full lse (finite) here; row_terms ignores them via has_set
    masked = torch.where(in_set | ~canon.has_set[:, None], z, torch.full_like(z, float("-inf")))
    # a set whose every id is masked (-inf logits) has set_lse = -inf and cl = +inf; its gradient takes
    # q = 0, as the fused paths do, instead of logsumexp's 0/0 = NaN
    dead = torch.isneginf(torch.logsumexp(masked.detach(), dim=1))
    set_lse = torch.logsumexp(torch.where(dead[:, None], masked.detach(), masked), dim=1)
    if canon.soft:
        listed = canon.soft_ids >= 0  # pads carry weight 0 and no logit (0 * -inf would be NaN)
        picked = z.gather(1, canon.soft_ids.clamp(min=0)) * canon.soft_weights
        soft_dot = torch.where(listed, picked, torch.zeros_like(picked)).sum(dim=1)
    else:
        soft_dot = torch.zeros_like(lse)
    logit_sum = z.sum(dim=1) if canon.label_smoothing else None
    stats = ShardStats(best, arg, lse, target_logit, set_lse, soft_dot, logit_sum)
    terms = row_terms(stats, canon)
    return stats, terms
