"""The concept-set cache: :func:`load_or_build_concepts` keeps built sets on disk, keyed by :func:`fingerprint`
(model + tokenizer), the build options and the token ids; files are written atomically with a checksum
(``fused_concept.training.durable``) and rebuilt, with a warning, when damaged or of an older format."""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import torch

from fused_concept.training.concepts.build import build_concept_sets, method
from fused_concept.training.concepts.content_words import TAGGINGS, as_2d
from fused_concept.training.durable import UnreadableFile, checksum, load_plain, matches, save_atomic

_FORMAT_NAME = "fused-concept-sets"
CACHE_FORMAT = f"{_FORMAT_NAME}/3"  # /3: adds "checksum"


# Config entries that do not change what the model computes for given ids: paths, versions, dtype,
# kernels, and run-time switches (cache, outputs) that training code flips.
_CONFIG_KEYS_IGNORED = {"_name_or_path", "name_or_path", "transformers_version", "_commit_hash",
                        "quantization_config", "dtype", "torch_dtype", "_attn_implementation",
                        "_attn_implementation_internal", "_experts_implementation", "use_cache",
                        "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
                        "torchscript", "pad_token_id", "gradient_checkpointing"}


def _sample_values(param: torch.Tensor, count: int = 32) -> bytes:
    flat = param.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    count = min(n, count)
    idx = torch.unique(torch.arange(count) * (n - 1) // max(1, count - 1)).to(flat.device)
    return flat[idx].float().cpu().numpy().tobytes()


def fingerprint(model, tokenizer) -> str:
    """``"<model_type>-<16 hex>"``: a hash of the model config (minus paths, versions, dtype and run-time
    switches such as ``use_cache``), sampled values of the first, last and head parameters, and the
    tokenizer's vocabulary size and a sample of its tokens. Two loads of the same weights and tokenizer
    agree; another model, config or vocabulary differs.
    """
    from fused_concept.integrations.hf.model_head import model_head, unwrap_peft

    inner = unwrap_peft(model)
    config = inner.config.to_dict()
    config = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED}
    digest = hashlib.sha256()
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = [p for _, p in inner.named_parameters()]
    head = model_head(inner).weight
    for p in (params[0], params[-1], head):
        digest.update(str(tuple(p.shape)).encode())
        digest.update(_sample_values(p))
    n_tok = len(tokenizer)
    sample = list(range(0, n_tok, max(1, n_tok // 64))) + list(range(max(0, n_tok - 8), n_tok))
    digest.update(str(n_tok).encode())
    digest.update("\x00".join(str(s) for s in tokenizer.convert_ids_to_tokens(sample)).encode())
    model_type = getattr(inner.config, "model_type", None) or type(inner).__name__
    return f"{model_type}-{digest.hexdigest()[:16]}"


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().long().contiguous().numpy().tobytes() + str(tuple(ids.shape)).encode()).hexdigest()


def _build_key(tokenizer, ids, build_kw) -> dict:
    """What, besides the model, decides the sets: options, the content mask (or how it is made) and the ids."""
    kw = dict(build_kw)
    kw.pop("progress", None)
    kw.pop("score_batch", None)
    mask = kw.pop("content_mask", None)
    nlp = kw.pop("nlp", "auto")
    tagging = kw.pop("tagging", "paper")
    if tagging not in TAGGINGS:
        raise ValueError(f"tagging must be one of {TAGGINGS}, got {tagging!r}")
    key = {
        "top_k": int(kw.pop("top_k", 100)),
        "max_synonyms": int(kw.pop("max_synonyms", 10)),
        "threshold": float(kw.pop("threshold", 0.75)),
        "pos_check": bool(kw.pop("pos_check", True)),
        "nlp": method(nlp),
        "content_mask": tagging if mask is None else _ids_digest(torch.as_tensor(mask).long()),
        "input_ids": _ids_digest(ids),
    }
    if kw:
        raise TypeError(f"unknown build_concept_sets options {sorted(kw)}")
    return key


def load_or_build_concepts(path, model, tokenizer, input_ids, **build_kw) -> torch.Tensor:
    """Concept sets for ``input_ids`` from the cache file ``path``, building (and saving) them when needed.

    * ``path`` exists, intact, same :func:`fingerprint`, same options and ids: its sets are returned;
    * ``path`` exists with another model's fingerprint: ``ValueError`` (the file is left alone);
    * ``path`` holds something that is not a concept cache: ``ValueError`` (the file is left alone);
    * ``path`` exists for this model but other options or ids, is damaged (unreadable, or its checksum
      does not match its content) or has an older format: rebuilt and overwritten, with a warning;
    * otherwise: :func:`build_concept_sets` ``(model, tokenizer, input_ids, **build_kw)``.

    The file is written atomically (a temp file of its own in the same folder, fsync, ``os.replace``):
    processes building the same path at once each write a complete file and the last one stays.
    """
    path = os.fspath(path)
    ids = as_2d(input_ids)
    fp = fingerprint(model, tokenizer)
    key = _build_key(tokenizer, ids, build_kw)
    cached = _read_cache(path, fp, key) if os.path.exists(path) else None
    if cached is not None:
        return cached.to(ids.device)
    concepts = build_concept_sets(model, tokenizer, ids, **build_kw).cpu()
    content = {"fingerprint": fp, "key": key, "concepts": concepts}
    save_atomic(path, {"format": CACHE_FORMAT, **content, "checksum": checksum(content)})
    return concepts.to(ids.device)


def _read_cache(path: str, fp: str, key: dict):
    """The sets stored in the cache file ``path`` when it is intact and was built for model ``fp`` with
    ``key``; None (after a warning saying why) when it must be rebuilt. Raises for another model's
    file or a file that is no concept cache (neither is overwritten)."""
    try:
        data = load_plain(path, "concept cache")
    except UnreadableFile as exc:
        warnings.warn(f"{exc}; rebuilding it", stacklevel=3)
        return None
    found = data.get("format") if isinstance(data, dict) else None
    if not (isinstance(found, str) and found.startswith(_FORMAT_NAME + "/")):
        raise ValueError(f"{path} is not a fused-concept concept cache ({CACHE_FORMAT}); "
                         "delete it or pass another path")
    if found != CACHE_FORMAT:
        warnings.warn(f"concept cache {path} has the older format {found}, not {CACHE_FORMAT}; rebuilding it",
                      stacklevel=3)
        return None
    content = {name: data.get(name) for name in ("fingerprint", "key", "concepts")}
    if not (isinstance(content["concepts"], torch.Tensor) and matches(content, data.get("checksum"))):
        warnings.warn(f"concept cache {path} is damaged (its checksum does not match its content); rebuilding it",
                      stacklevel=3)
        return None
    if content["fingerprint"] != fp:
        raise ValueError(
            f"concept cache {path} was built for model {content['fingerprint']}, not {fp}; "
            "delete it or pass another path"
        )
    if content["key"] == key:
        return content["concepts"]
    changed = sorted(name for name in key if content["key"].get(name) != key[name])
    warnings.warn(f"concept cache {path} was built with other {', '.join(changed)}; rebuilding it", stacklevel=3)
    return None
