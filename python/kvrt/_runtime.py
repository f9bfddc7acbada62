"""Runtime and Sequence: the Pythonic surface over kvrt_runtime and kvrt_seq_id.

Tensors are anything with DLPack (NumPy arrays, PyTorch tensors, CuPy arrays), C-contiguous, in
the runtime's dtype; they are passed to libkvrt by pointer, never copied. Host tensors use the
plain calls; CUDA tensors use the _ex calls with KVRT_MEMORY_DEVICE on a CUDA stream: `stream=`
when given (a cudaStream_t as an int, 0 = the legacy default stream), else the current stream of
the tensor's framework (torch.cuda.current_stream(), cupy.cuda.get_current_stream()).
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Sequence as Seq

import numpy as np

from . import _kvrt
from ._config import Config, ConfigLike, make_config
from ._stats import Stats

Tensor = Any  # a DLPack tensor: numpy.ndarray, torch.Tensor, cupy.ndarray, ...

_POLICIES = {"retrieval": 0, "streaming": 1}


class _Torch:
    """torch's fast paths, once torch is imported (kvrt never imports it itself): per call, a
    torch tensor crosses as torch.utils.dlpack.to_dlpack's capsule (Tensor.__dlpack__ is Python
    code that, for a CUDA tensor, also looks up streams to order them; kvrt is handed the stream
    itself) and the current stream is read raw. An attend's binding took 24 us without them and
    9-13 us with them on the H200 machine (docs/benchmarks.md, "The Python binding's cost per
    layer-step")."""

    tensor: Any = None
    to_dlpack: Any = None
    raw_stream: Any = None

    @classmethod
    def ready(cls) -> bool:
        if cls.tensor is None:
            torch = sys.modules.get("torch")
            if torch is None or not hasattr(torch, "Tensor"):
                return False  # not imported (or still importing): the generic path
            import torch.utils.dlpack
            raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
            cls.raw_stream = raw if raw is not None else (
                lambda index: torch.cuda.current_stream(index).cuda_stream)
            cls.to_dlpack = torch.utils.dlpack.to_dlpack
            cls.tensor = torch.Tensor
        return True


def _is_torch(t: Any) -> bool:
    return _Torch.ready() and isinstance(t, _Torch.tensor)


def _arg(t: Tensor) -> Any:
    """What crosses to the extension for tensor `t`: a DLPack capsule for a plain torch tensor,
    else `t` itself (nanobind calls its __dlpack__, or reads its buffer)."""
    if _is_torch(t) and t.is_neg():
        # A lazily negated view (its storage holds -t): DLPack hands over the storage.
        t = t.resolve_neg()
    if isinstance(t, np.ndarray) and not t.dtype.isnative:
        # The binding's overloads refuse it with a signature dump that names nothing.
        raise TypeError(f"kvrt: an array of non-native byte order ({t.dtype.str!r}); pass "
                        f"arr.astype({t.dtype.newbyteorder('=').str!r})")
    if type(t) is _Torch.tensor or (_Torch.tensor is None and _Torch.ready()
                                    and type(t) is _Torch.tensor):
        try:
            return _Torch.to_dlpack(t)
        except Exception:  # the generic path reports what is wrong with it
            return t
    return t


def _out(t: Tensor, name: str = "out") -> Any:
    """_arg for a tensor kvrt writes: kvrt writes it outside autograd and torch's version
    counters, so a tensor that autograd tracks (or may have saved for backward), an inference
    tensor outside inference mode, or a lazily negated view, is refused as torch's own in-place
    writes refuse them (gradients would come out silently wrong)."""
    if _is_torch(t):
        import torch
        problem = ("requires grad" if t.requires_grad
                   else "is an inference tensor, written outside inference mode"
                   if t.is_inference() and not torch.is_inference_mode_enabled()
                   else "is a negated view (its storage holds -out)" if t.is_neg()
                   else "")
        if problem:
            raise ValueError(f"kvrt: {name} {problem}; pass a plain tensor (e.g. torch.empty(..., "
                             "dtype=torch.float32)) and copy from it")
    if isinstance(t, np.ndarray) and not t.flags.writeable:
        raise TypeError(f"kvrt: {name} is read-only; pass a writable f32 array")
    return _arg(t)


def _current_stream(t: Tensor) -> int:
    """The framework's current CUDA stream for a device tensor `t` (0 for host tensors)."""
    if type(t) is _Torch.tensor:
        return int(_Torch.raw_stream(t.get_device())) if t.is_cuda else 0
    mod = type(t).__module__
    if mod.startswith("torch"):
        if not t.is_cuda:
            return 0
        import torch
        return int(torch.cuda.current_stream(t.device).cuda_stream)
    if mod.startswith("cupy"):
        import cupy
        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _opt(t: Optional[Tensor]) -> Any:
    """_out for an optional output (None stays None: the extension's std::optional)."""
    return None if t is None else _out(t, "lse")


def _empty_f32(like: Tensor, shape: tuple[int, ...]) -> Tensor:
    """An uninitialised f32 array of `shape` in the framework and on the device of `like`."""
    mod = type(like).__module__
    if mod.startswith("torch"):
        import torch
        return torch.empty(shape, dtype=torch.float32, device=like.device)
    if mod.startswith("cupy"):
        import cupy
        with cupy.cuda.Device(like.device.id):
            return cupy.empty(shape, dtype=cupy.float32)
    return np.empty(shape, dtype=np.float32)


class Runtime:
    """A kvrt runtime (kvrt_runtime_create). Build it from keyword arguments, a kvrt.Config or a
    dict of kvrt_config fields, or both (keywords override)::

        rt = kvrt.Runtime(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=64,
                          dtype="f32", index_kind="flat", top_k=100)

    Raises InvalidArgumentError naming the field for a value the library refuses. Close it with
    close() or a `with` block (the garbage collector closes it too); sequences keep it alive.
    """

    def __init__(self, config: ConfigLike = None, **kwargs: Any):
        cfg = make_config(config, **kwargs)
        self._impl = _kvrt.Runtime(cfg.to_dict())
        self._config = Config.from_dict(self._impl.config())
        self._gpu = self._config.use_gpu == 1
        self._out_shape = (self._config.num_q_heads, self._config.head_dim)

    def _values(self, k: Tensor, v: Optional[Tensor]) -> Tensor:
        """v, or k for v=None on a runtime of values_are_keys (kvrt reads no values then, as
        the C calls take a NULL v)."""
        if v is not None:
            return v
        if not self._config.values_are_keys:
            raise ValueError("kvrt: v is None; only a runtime made with values_are_keys=1 takes "
                             "no values")
        return k

    @property
    def config(self) -> Config:
        """The effective configuration (kvrt_runtime_config: scale, worker_threads and use_gpu
        resolved)."""
        return self._config

    def describe_search(self) -> str:
        """The search this runtime's config resolves, in words (kvrt_runtime_describe_search):
        the index kind's settings at its top_k and search effort, e.g. the cluster kind's budget,
        group selection and two-stage rescore."""
        return self._impl.describe_search()

    @property
    def closed(self) -> bool:
        return self._impl.closed

    def close(self) -> None:
        """Destroys the runtime (kvrt_runtime_destroy); later calls raise
        FailedPreconditionError. Idempotent."""
        self._impl.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefill_query_rows(self, n_tokens: int) -> tuple[int, int]:
        """(count, stride): the rows i * stride, i < count, whose queries a prefill of n_tokens
        reads (kvrt_prefill_query_rows; count 0 for an index kind that reads none). Pass q of
        just these rows to Sequence.prefill(..., sampled=True)."""
        return tuple(self._impl.prefill_query_rows(n_tokens))

    def sequence(self) -> "Sequence":
        """A new empty sequence (kvrt_seq_create)."""
        return Sequence(self)

    def stats(self) -> Stats:
        """A snapshot of kvrt_get_stats."""
        return Stats(**self._impl.stats())

    def attend_batch(self, seqs: Seq["Sequence"], layer: int, q: Tensor,
                     out: Optional[Tensor] = None, *, lse: Optional[Tensor] = None,
                     stream: Optional[int] = None) -> Tensor:
        """One decode query per sequence (kvrt_attend_batch): q [len(seqs), q_heads, head_dim]
        (row i belongs to seqs[i]); returns out, f32 [len(seqs), q_heads, head_dim] (allocated
        like q when not given). If one sequence fails, the error names it and the other rows are
        written (kvrt.h). lse: an f32 [len(seqs), q_heads] array beside out that receives each
        head's log-sum-exp of its scaled scores over every token weighed
        (kvrt_attend_batch_lse_ex), to merge out with attention of your own."""
        ids = self._ids(seqs, "attend_batch")
        if out is None:
            out = _empty_f32(q, (len(ids),) + self._out_shape)
        if stream is None:
            stream = _current_stream(q) if self._gpu else 0
        self._impl.attend_batch(ids, layer, _arg(q), _out(out), _opt(lse), stream)
        return out

    def append_attend_batch(self, seqs: Seq["Sequence"], layer: int, q: Tensor, k: Tensor,
                            v: Optional[Tensor], out: Optional[Tensor] = None, *,
                            lse: Optional[Tensor] = None,
                            stream: Optional[int] = None) -> Tensor:
        """A batched decoder layer-step in one call: row i of k, v [len(seqs), kv_heads, head_dim]
        is appended to seqs[i] (kvrt_append), then attend_batch of q [len(seqs), q_heads,
        head_dim]. Same result as those calls, one crossing into the library. An append that
        fails raises, naming its sequence, before anything is attended (the appends before it
        stand); errors of the attend are attend_batch's. lse: as attend_batch's."""
        ids = self._ids(seqs, "append_attend_batch")
        if out is None:
            out = _empty_f32(q, (len(ids),) + self._out_shape)
        if stream is None:
            stream = _current_stream(q) if self._gpu else 0
        self._impl.append_attend_batch(ids, layer, _arg(q), _arg(k), _arg(self._values(k, v)),
                                       _out(out), _opt(lse), stream)
        return out

    def _ids(self, seqs: Seq["Sequence"], call: str) -> list[int]:
        ids = []
        for s in seqs:
            if s._rt is not self:
                raise ValueError(f"{call}: every sequence must belong to this runtime")
            ids.append(s.id)
        if not ids:  # the shapes' check would say "no tokens"
            raise ValueError(f"{call}: needs at least one sequence")
        return ids

    def set_head_policy(self, layer: int, q_head: int, policy: str | int) -> None:
        """"streaming" serves (layer, q_head) from sinks + window only; "retrieval" (the
        default) searches the cold tier too. Not while an attend runs."""
        p = _POLICIES.get(policy, policy) if isinstance(policy, str) else policy
        if isinstance(p, str):
            raise ValueError(f"policy must be one of {', '.join(_POLICIES)}, not {policy!r}")
        self._impl.set_head_policy(layer, q_head, p)

    def set_search_effort(self, effort: int) -> None:
        """Changes search_effort for later searches (kvrt_set_search_effort)."""
        self._impl.set_search_effort(effort)
        self._config = self._config.replace(search_effort=effort)

    def __repr__(self) -> str:
        c = self._config
        state = "closed" if self.closed else f"{'gpu' if self._gpu else 'host'} backend"
        return (f"kvrt.Runtime({state}, layers={c.num_layers}, heads={c.num_q_heads}/"
                f"{c.num_kv_heads}x{c.head_dim}, dtype={c.dtype}, index={c.index_kind}, "
                f"top_k={c.top_k}, sinks={c.sink_tokens}, window={c.window_tokens})")


class Sequence:
    """One sequence of a Runtime (a kvrt_seq_id). Released by release(), a `with` block, or
    when garbage-collected. Calls on one sequence must not run concurrently; different sequences
    may be driven from different threads (the GIL is released inside the library)."""

    def __init__(self, runtime: Runtime):
        self._rt = runtime
        self._impl = runtime._impl
        self.id: int = self._impl.seq_create()
        self._released = False

    @property
    def runtime(self) -> Runtime:
        return self._rt

    def prefill(self, layer: int, q: Optional[Tensor], k: Tensor, v: Optional[Tensor], *,
                stream: Optional[int] = None, sampled: bool = False) -> None:
        """The prompt of one layer (kvrt_prefill): k, v [n, kv_heads, head_dim], q
        [n, q_heads, head_dim] or None. The layer must be empty. Returns once the rows are stored;
        the index is built in the background (wait()).

        sampled=True: q holds only some of the prompt's queries, [m, q_heads, head_dim] with
        m <= n, in prompt order (kvrt_prefill_sampled_ex); the rows that
        Runtime.prefill_query_rows(n) names give the index of every query, without copying the
        rest (m = 0, for a kind that reads no queries, is the same as q=None)."""
        if stream is None:
            stream = _current_stream(k) if self._rt._gpu else 0
        self._impl.prefill(self.id, layer, None if q is None else _arg(q), _arg(k),
                           _arg(self._rt._values(k, v)), stream, sampled)

    def append(self, layer: int, k: Tensor, v: Optional[Tensor], *,
               stream: Optional[int] = None) -> None:
        """Appends n tokens' k, v [n, kv_heads, head_dim] (kvrt_append)."""
        if stream is None:
            stream = _current_stream(k) if self._rt._gpu else 0
        self._impl.append(self.id, layer, _arg(k), _arg(self._rt._values(k, v)), stream)

    def attend(self, layer: int, q: Tensor, out: Optional[Tensor] = None, *,
               lse: Optional[Tensor] = None, stream: Optional[int] = None) -> Tensor:
        """One decode query q [q_heads, head_dim] over every token of the layer (kvrt_attend);
        writes and returns out, f32 [q_heads, head_dim] (allocated like q when not given). With
        device tensors out is written in stream order when this returns. lse: an f32 [q_heads]
        array beside out that receives each head's log-sum-exp (natural log) of its scaled
        scores over every token weighed (kvrt_attend_batch_lse_ex): out merges exactly with
        attention computed elsewhere, or takes a learned sink logit s as
        out * sigmoid(lse - s)."""
        if out is None:
            out = _empty_f32(q, self._rt._out_shape)
        if stream is None:
            stream = _current_stream(q) if self._rt._gpu else 0
        self._impl.attend(self.id, layer, _arg(q), _out(out), _opt(lse), stream)
        return out

    def append_attend(self, layer: int, q: Tensor, k: Tensor, v: Optional[Tensor],
                      out: Optional[Tensor] = None, *, lse: Optional[Tensor] = None,
                      stream: Optional[int] = None) -> Tensor:
        """A decoder's layer-step in one call: append(layer, k, v) then attend(layer, q, out).
        Same result as the two calls, with one crossing into the library (the binding's cost of
        a layer-step, issue 15). An append that fails raises before the attend; an attend that
        fails leaves the appended rows in place, as the two calls would. lse: as attend's."""
        if out is None:
            out = _empty_f32(q, self._rt._out_shape)
        if stream is None:
            stream = _current_stream(q) if self._rt._gpu else 0
        self._impl.append_attend(self.id, layer, _arg(q), _arg(k), _arg(self._rt._values(k, v)),
                                 _out(out), _opt(lse), stream)
        return out

    def wait(self) -> None:
        """Waits for the sequence's background work (kvrt_seq_wait): a prefill returns before its
        index is built, and on the GPU backend from device tensors before its cold rows reach the
        host store; the next call on that layer waits anyway, so this is for timing."""
        self._impl.seq_wait(self.id)

    def length(self, layer: int) -> int:
        """Tokens the layer holds, all tiers (kvrt_seq_length)."""
        return self._impl.seq_length(self.id, layer)

    def attended(self, layer: int, q_head: int) -> np.ndarray:
        """Positions the last attend on `layer` used for `q_head` (kvrt_get_attended; needs
        record_attended=1): GPU tier first, then the retrieved cold tokens."""
        return np.asarray(self._impl.get_attended(self.id, layer, q_head), dtype=np.int64)

    def estimate_lse(self, layer: int, q_head: int) -> float:
        """The lse the last attend on `layer` added for `q_head` as the cluster kind's estimate of
        the cold tokens it did not attend (kvrt_get_estimate_lse; -inf: none; needs
        record_attended=1)."""
        return float(self._impl.get_estimate_lse(self.id, layer, q_head))

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> None:
        """Frees the sequence's KV in every tier (kvrt_seq_release). Idempotent."""
        if not self._released:
            self._released = True
            if not self._impl.closed:
                self._impl.seq_release(self.id)

    def __enter__(self) -> "Sequence":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown, or the runtime already gone
            pass

    def __repr__(self) -> str:
        return f"kvrt.Sequence(id={self.id}{', released' if self._released else ''})"
