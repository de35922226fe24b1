"""Cosine of every synonym candidate of a sequence, in one forward on top of the sequence's cache.

For a content word at position ``t`` of ``seq`` (length ``T``) and a candidate token ``c``, the score is
the cosine between the base model's last hidden state at ``t`` for ``seq[:t] + [c]`` and the original
one for ``seq[:t + 1]`` (causal attention: later tokens change neither).

One forward of the sequence gives the reference hidden states and its key/value cache. Then the
candidates of ALL content positions of the sequence, ``n`` of them, run as ONE continuation of length
``n`` on top of that cache: candidate ``i`` sits at key index ``T + i`` with position id ``t_i``, and a 4-D
additive attention mask ``[1, 1, n, T + n]`` lets it see the cached keys ``0 .. t_i - 1`` and itself only,
never the other candidates. Its hidden state is then exactly the one of ``seq[:t_i] + [c_i]`` run alone.
Every matrix multiply sees all ``n`` rows at once, the cached keys are read in place (no per-candidate
copy), and attention costs ``n * (T + n)`` scores; ``batch`` caps ``n`` per forward (the cache is cropped
back to ``T`` after each). Models whose cache cannot be cropped run ``seq + candidates`` from scratch.
"""

from __future__ import annotations

from typing import List, Sequence

import torch


def candidate_mask(positions: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, n, length + n]: row i sees keys ``0 .. positions[i] - 1`` and key ``length + i``."""
    n = positions.shape[0]
    keys = torch.arange(length + n, device=positions.device)
    rows = torch.arange(n, device=positions.device)
    visible = (keys[None, :] < positions[:, None]) | (keys[None, :] == length + rows[:, None])
    mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device)
    mask.masked_fill_(~visible, torch.finfo(dtype).min)
    return mask[None, None]


def _causal_block(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    keep = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    return torch.zeros(length, length, dtype=dtype, device=device).masked_fill_(~keep, torch.finfo(dtype).min)


def _hidden_of_candidates(base, seq, full, candidates, positions):
    """Last hidden state [n, D] of each candidate at its position (see the module docstring)."""
    length, dtype = seq.shape[0], full.last_hidden_state.dtype
    mask = candidate_mask(positions, length, dtype)
    cache = full.past_key_values
    if hasattr(cache, "crop"):
        out = base(input_ids=candidates[None], position_ids=positions[None], attention_mask=mask,
                   past_key_values=cache, use_cache=True)
        cache.crop(-candidates.shape[0])  # negative: drop the last n entries
        return out.last_hidden_state[0]
    whole = torch.zeros(1, 1, length + candidates.shape[0], length + candidates.shape[0], dtype=dtype,
                        device=seq.device)
    whole[..., :length, :length] = _causal_block(length, dtype, seq.device)
    whole[..., :length, length:] = torch.finfo(dtype).min
    whole[..., length:, :] = mask
    ids = torch.cat([seq, candidates])[None]
    position_ids = torch.cat([torch.arange(length, device=seq.device), positions])[None]
    out = base(input_ids=ids, position_ids=position_ids, attention_mask=whole, use_cache=False)
    return out.last_hidden_state[0, length:]


@torch.no_grad()
def score_sequence(base, seq: torch.Tensor, full, positions: Sequence[int], candidates: Sequence[torch.Tensor],
                   *, batch: int = 1024) -> List[torch.Tensor]:
    """Cosines of ``candidates[j]`` (ids) substituted at ``positions[j]`` of ``seq`` [T], one tensor per j
    (float32; float64 for a float64 model). ``full`` is ``base(input_ids=seq[None], use_cache=True)``."""
    counts = [int(c.numel()) for c in candidates]
    if sum(counts) == 0:
        return [torch.zeros(0) for _ in counts]
    device = seq.device
    flat = torch.cat([c.reshape(-1).to(device) for c in candidates])
    where = torch.repeat_interleave(torch.tensor(list(positions), device=device),
                                    torch.tensor(counts, device=device))
    reference = full.last_hidden_state[0]
    cosines = []
    for start in range(0, flat.numel(), batch):
        rows = slice(start, start + batch)
        got = _hidden_of_candidates(base, seq, full, flat[rows], where[rows])
        dtype = torch.promote_types(got.dtype, torch.float32)
        cosines.append(torch.nn.functional.cosine_similarity(got.to(dtype), reference[where[rows]].to(dtype), dim=-1))
    return list(torch.cat(cosines).cpu().split(counts))
