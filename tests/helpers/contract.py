"""A float64 transcription of the contract, docs/math.md, written row by row from the formulas and
sharing no code with the package, used as the oracle of the numeric tests.

`contract_loss` returns (loss, stats) where loss is differentiable w.r.t. the float64 copies of
hidden / weight / bias made by `as_float64`; the hinge indicator is a constant, as the contract says.
"""
import math

import torch


def as_float64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def contract_loss(hidden, weight, targets, concepts=None, *, bias=None, ntp_weight=1.0, concept_weight=1.0,
                  margin=None, mode="marginal", concept_probs=None, include_target=True, ignore_index=-100,
                  reduction="mean", softcap=None, z_loss=0.0, label_smoothing=0.0, shift=False):
    """All float tensors must already be float64. Returns (loss, dict of per-row stats)."""
    if shift:  # "exactly the loss of hidden[..., :-1, :] against targets[..., 1:]"
        per_token = [x[..., 1:] if isinstance(x, torch.Tensor) and x.shape == targets.shape else x
                     for x in (ntp_weight, concept_weight)]
        ntp_weight, concept_weight = per_token
        hidden, targets = hidden[..., :-1, :], targets[..., 1:]
        concepts = None if concepts is None else concepts[..., 1:, :]
        concept_probs = None if concept_probs is None else concept_probs[..., 1:, :]
    lead = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1).tolist()
    n = h.shape[0]
    k = 0 if concepts is None else concepts.shape[-1]
    c = [[] for _ in range(n)] if concepts is None else concepts.reshape(n, k).tolist()
    w = None if concept_probs is None else concept_probs.reshape(n, k).double()

    def per_row(x):
        if isinstance(x, torch.Tensor):
            return x.reshape(-1).double().tolist()
        return [float(x)] * n

    alpha, beta = per_row(ntp_weight), per_row(concept_weight)
    z_all = h @ weight.t()
    if bias is not None:
        z_all = z_all + bias
    if softcap is not None:
        z_all = softcap * torch.tanh(z_all / softcap)
    rows, lse_s, ce_s, mass_s, arg_s = [], [], [], [], []
    # a 0 that keeps the graph connected (autograd.grad needs every input used), and stays 0 when a
    # logit is -inf (a masked id): -inf * 0 would be NaN
    zero = torch.where(torch.isfinite(z_all), z_all, torch.zeros_like(z_all)).sum() * 0.0
    for i in range(n):
        z = z_all[i]
        lse = torch.logsumexp(z, 0)
        lse_s.append(lse.detach())
        arg_s.append(int(torch.argmax(z.detach())))
        if y[i] == ignore_index:
            rows.append(zero)
            ce_s.append(0.0)
            mass_s.append(0.0)
            continue
        ce = lse - z[y[i]]
        eps = label_smoothing  # the token term against (1 - eps) onehot(y) + eps / V
        tok = lse - (1 - eps) * z[y[i]] - eps / z.shape[0] * z.sum() if eps else ce
        listed = [t for t in c[i] if t != -1]
        members = set(listed) | ({y[i]} if include_target and listed else set())
        if members:
            lse_set = torch.logsumexp(z[sorted(members)], 0)
            mass = math.exp(float((lse_set - lse).detach()))
            if mode == "marginal":
                cl = lse - lse_set
            else:
                cl = lse - sum(w[i, j] * z[t] for j, t in enumerate(c[i]) if t != -1)
            hinge = 1.0 if margin is None else float(mass < margin)
            cl = cl * hinge
        else:
            mass, cl = 0.0, zero
        loss = alpha[i] * tok + beta[i] * cl
        if z_loss:
            loss = loss + z_loss * lse ** 2
        rows.append(loss)
        ce_s.append(float(ce.detach()))
        mass_s.append(mass)
    stacked = torch.stack(rows) if rows else zero.reshape(1)[:0]  # N = 0: no rows
    n_valid = sum(1 for t in y if t != ignore_index)
    if reduction == "none":
        loss = stacked.reshape(lead)
    elif reduction == "sum":
        loss = stacked.sum()
    else:
        loss = stacked.sum() / max(n_valid, 1)
    stats = {
        "lse": (torch.stack(lse_s) if lse_s else torch.zeros(0, dtype=torch.float64)).reshape(lead),
        "ce": torch.tensor(ce_s, dtype=torch.float64).reshape(lead),
        "mass": torch.tensor(mass_s, dtype=torch.float64).reshape(lead),
        "argmax": torch.tensor(arg_s, dtype=torch.int64).reshape(lead),
    }
    return loss, stats


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def paper_objective_weights(targets, concepts, lam, *, n_valid=None, n_content=None):
    """The paper's objective as contract_loss's per-row weights with reduction="sum" (concept-loss.md):
    alpha = (1 - lam) / N_v on content rows and 1 / N_v elsewhere, beta = lam / |T| on content rows, 0 on
    ignored rows. N_v and |T| are counted from targets / concepts unless given (e.g. over a whole step)."""
    valid = targets != -100
    content = valid & (concepts != -1).any(-1)
    n_valid = int(valid.sum()) if n_valid is None else n_valid
    n_content = max(int(content.sum()) if n_content is None else n_content, 1)
    alpha = torch.where(content, (1 - lam) / n_valid, 1.0 / n_valid).double() * valid
    beta = torch.where(content, lam / n_content, 0.0).double()
    return dict(ntp_weight=alpha, concept_weight=beta, reduction="sum")
