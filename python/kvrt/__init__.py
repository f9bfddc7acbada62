"""kvrt: attend over contexts larger than GPU memory.

kvrt keeps the attention sinks and a recent window of every sequence's KV on the GPU tier, moves
older keys and values to host memory behind CPU-side indexes, and merges exact attention over the
GPU tier with attention over the retrieved cold tokens (log-sum-exp). This package binds libkvrt's
C API (api/include/kvrt.h)::

    import numpy as np, kvrt
    rt = kvrt.Runtime(num_layers=1, num_q_heads=8, num_kv_heads=2, head_dim=64, dtype="f32",
                      index_kind="flat", top_k=100, window_tokens=512)
    seq = rt.sequence()
    seq.prefill(0, q, k, v)          # q [T, 8, 64], k, v [T, 2, 64]
    seq.append(0, k1, v1)            # [1, 2, 64]
    out = seq.attend(0, q1)          # q1 [8, 64] -> f32 [8, 64]
    out = seq.append_attend(0, q2, k2, v2)   # a decoder's layer-step in one call
    print(rt.stats())

kvrt.hf turns it on for a Hugging Face transformers model; `python -m kvrt.generate` generates
text with it.
"""

from __future__ import annotations

from . import _kvrt


def _check_library() -> None:
    """The libkvrt the loader found (LD_LIBRARY_PATH ranks above the package's own) must be the
    minor version the extension was compiled against and no older: an older one lacks fixes and
    config fields the package passes, which it would ignore or refuse without saying why."""
    want = tuple(_kvrt.header_version())
    have_s = _kvrt.version()
    try:
        have = tuple(int(x) for x in have_s.split(".")[:3])
    except ValueError:
        have = (-1, -1, -1)
    if have[:2] == want[:2] and have >= want:
        return
    path = "?"
    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libkvrt.so" in line), "?")
    except OSError:
        pass
    raise ImportError(
        f"kvrt: the package needs libkvrt {'.'.join(map(str, want))} (or a later "
        f"{want[0]}.{want[1]}.x) but loaded {have_s} from {path}; LD_LIBRARY_PATH ranks above the "
        "package's own library: drop the other libkvrt from it or install the matching package")


_check_library()
from ._config import Config
from ._errors import (CudaError, FailedPreconditionError, InternalError, InvalidArgumentError,
                      KvrtError, KvrtIOError, NotFoundError, OutOfMemoryError, UnimplementedError)
from ._runtime import Runtime, Sequence
from ._stats import Stats

__version__ = "0.3.37"


def library_version() -> str:
    """The version of the libkvrt loaded (kvrt_version)."""
    return _kvrt.version()


def index_kinds() -> list[str]:
    """The index kinds the loaded libkvrt knows, by name."""
    return list(_kvrt.index_kinds())


def describe_search(index_kind: str, top_k: int, search_effort: int = 0) -> str:
    """What search settings `index_kind` resolves for top_k and search_effort, in words."""
    return _kvrt.describe_search(index_kind, top_k, search_effort)


__all__ = [
    "Config", "Runtime", "Sequence", "Stats", "KvrtError", "InvalidArgumentError",
    "NotFoundError", "OutOfMemoryError", "FailedPreconditionError", "UnimplementedError",
    "InternalError", "CudaError", "KvrtIOError", "library_version", "index_kinds",
    "describe_search",
]
