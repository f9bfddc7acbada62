"""Shared helpers: a NumPy reference of full attention (f32, GQA), random KV, and a loader of
the tools/gpu_bench scripts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Softmax attention of one query q [Hq, d] over all tokens k, v [T, Hkv, d] (GQA: q head h
    uses kv head h // (Hq // Hkv)), in float64. Returns [Hq, d]."""
    hq, hkv = q.shape[0], k.shape[1]
    g = hq // hkv
    kk = np.repeat(k.astype(np.float64), g, axis=1)  # [T, Hq, d]
    vv = np.repeat(v.astype(np.float64), g, axis=1)
    s = np.einsum("hd,thd->ht", q.astype(np.float64), kk) * scale
    s -= s.max(axis=1, keepdims=True)
    w = np.exp(s)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("ht,thd->hd", w, vv)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


SHAPE = dict(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=32)


def kv(rng: np.random.Generator, n: int, heads: int = 2, d: int = 32) -> np.ndarray:
    return rng.standard_normal((n, heads, d), dtype=np.float32)


@pytest.fixture
def gpu_bench_tool():
    """Loads a script of tools/gpu_bench (not a package) as a module: gpu_bench_tool("name")."""
    tools = Path(__file__).resolve().parents[2] / "tools" / "gpu_bench"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, tools / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
