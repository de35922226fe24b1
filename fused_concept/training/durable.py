"""Files that survive crashes and damage: atomic replacement, safe loading and content checksums.

`write_atomic` makes a file either its old content or one writer's complete new content, whatever
kills the process and however many processes write the same path at once. `load_plain` reads a
`torch.save` file with `weights_only=True` (no code in the file ever runs) and says clearly why a file
cannot be read. `checksum` detects what an atomic write cannot prevent (a file truncated or altered
afterwards): training checkpoints and the concept cache store it and verify it when they load.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pickle
import re
import secrets
from typing import Callable, IO

import torch

_TEMP_MARK = ".tmp-"  # temp files are "<name>.tmp-<pid>-<random>", next to the file they become


def write_atomic(path: str, write: Callable[[IO[bytes]], None], *, sole_writer: bool = False) -> None:
    """Write `path` through `write(handle)`: into a new temp file in the same folder (unique per
    writer), fsync, `os.replace` over `path`, then fsync the folder so the rename is durable too.
    The temp file is removed when `write` raises; a killed writer leaves only its temp file behind.
    `sole_writer=True` (no other process writes `path`: a run's own outputs) then removes the temp
    files of `path` that killed writes left."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}{_TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 minus the umask, as open()
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if os.name == "posix":
        folder_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
    if sole_writer:
        for stale in glob.glob(glob.escape(path) + _TEMP_MARK + "*"):
            os.remove(stale)


def save_atomic(path: str, payload, *, sole_writer: bool = False) -> None:
    """`torch.save(payload)` to `path` through `write_atomic`."""
    write_atomic(path, lambda handle: torch.save(payload, handle), sole_writer=sole_writer)


class UnreadableFile(ValueError):
    """A file `load_plain` cannot read: truncated or garbled (`refused` False), or holding objects
    other than tensors and plain data, which `weights_only=True` refuses to build (`refused` True)."""

    def __init__(self, message: str, *, refused: bool):
        super().__init__(message)
        self.refused = refused


def load_plain(path: str, what: str):
    """`torch.load(path, weights_only=True)` on the CPU; `UnreadableFile` naming `what` and `path` when
    the file is damaged or refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise UnreadableFile(f"{what} {path} cannot be read (UnpicklingError: {_first_line(exc)})",
                                 refused=False) from exc
        found = re.search(r"GLOBAL (\S+)", str(exc))
        raise UnreadableFile(
            f"{what} {path} holds objects other than tensors and plain data"
            + (f" ({found.group(1)})" if found else "")
            + "; torch.load(weights_only=True) refused it and ran none of its code (fused-concept never "
            "writes such a file)", refused=True) from exc
    except Exception as exc:
        raise UnreadableFile(f"{what} {path} cannot be read, it is truncated or garbled "
                             f"({type(exc).__name__}: {_first_line(exc)})", refused=False) from exc


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip()[:200] if lines else "no message"


def checksum(payload) -> str:
    """sha256 (hex) of plain data: dicts (keys in a fixed order), lists, tuples, str, int, float,
    bool, None and tensors (dtype, shape and bytes); TypeError for anything else (a numpy scalar, say,
    which `weights_only=True` would refuse to load). Equal after a `torch.save` / `torch.load` round
    trip; any changed value, key, shape or tensor byte changes it."""
    digest = hashlib.sha256()
    _feed(digest, payload)
    return digest.hexdigest()


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=repr):
            _feed(digest, key)
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__[0]}{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    elif value is None or type(value) in (bool, int, float, str):  # not subclasses: numpy scalars would not load
        digest.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"checksum covers plain data and tensors only, got {type(value).__name__}")


def matches(content, stored) -> bool:
    """Whether `stored` is `checksum(content)` (False too when `content` holds what checksum does not cover)."""
    try:
        return isinstance(stored, str) and stored == checksum(content)
    except TypeError:
        return False
