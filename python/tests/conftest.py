"""Shared helpers: a NumPy reference of full attention (f32, GQA), random KV, a loader of the
tools/gpu_bench scripts, and the config fields of the tiny random transformers models."""

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

# Tiny random transformers decoders (test_hf_families.py, test_tp.py): fields over every family's
# config, and those of multi-head latent attention (DeepSeek-V2/V3's) and its MoE.
COMMON = dict(vocab_size=258, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
              pad_token_id=0, bos_token_id=1, eos_token_id=257)
MLA = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16,
           qk_nope_head_dim=32, v_head_dim=24)
MLA_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
               moe_intermediate_size=64)


def kv(rng: np.random.Generator, n: int, heads: int = 2, d: int = 32) -> np.ndarray:
    return rng.standard_normal((n, heads, d), dtype=np.float32)


def load_tool(folder: str, name: str):
    """A script of tools/<folder> (not a package) as a module."""
    path = Path(__file__).resolve().parents[2] / "tools" / folder / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def gpu_bench_tool():
    """Loads a script of tools/gpu_bench as a module: gpu_bench_tool("name")."""
    return lambda name: load_tool("gpu_bench", name)
