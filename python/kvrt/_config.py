"""Config: the fields of kvrt_config (api/include/kvrt.h), with enums by name.

The defaults are kvrt_config_default()'s (a test checks them against the library). Range checks
are the library's: kvrt.Runtime(config) raises InvalidArgumentError naming the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Union

Dtype = Literal["f32", "f16", "bf16"]
ColdAttention = Literal["cpu", "fetch", "auto"]


@dataclass
class Config:
    """A kvrt_config. Field meanings and ranges are those of kvrt.h.

    Attributes:
        num_layers: attention layers kvrt serves (numbered 0 .. num_layers - 1).
        num_q_heads: query heads, a multiple of num_kv_heads.
        num_kv_heads: key/value heads (GQA group = num_q_heads // num_kv_heads).
        head_dim: dimension of one head.
        dtype: storage dtype of k and v, and the dtype of q passed in: "f32", "f16" or "bf16".
            Attention outputs are always f32.
        scale: score scale; 0 means 1/sqrt(head_dim).
        sink_tokens: first tokens always kept on the GPU tier.
        window_tokens: most recent tokens kept on the GPU tier.
        top_k: cold tokens retrieved per q head and step (ignored by "exact").
        index_kind: "exact", "flat", "ivf", "hnsw", "landmark", "attention-aware", "cluster"
            (kvrt.index_kinds() lists what the loaded library knows).
        search_effort: index-specific effort; 0 = the kind's default.
        worker_threads: CPU threads for search and attention; 0 = all hardware threads
            (worker_cpu_count when that is set).
        record_attended: 1 to remember the attended positions (Sequence.attended).
        use_gpu: 0 host backend, 1 CUDA backend, -1 CUDA when available.
        host_memory_limit: bytes of host KV store + indexes; 0 = no limit.
        gpu_memory_limit: bytes of GPU-tier buffers; 0 = no limit.
        check_finite: 1 rejects NaN/Inf in host q, k, v.
        group_search: 1 = one index search per kv head for its q heads.
        cold_attention: "cpu", "fetch" or "auto" (GPU backend).
        hot_cache_fraction: GPU hot cache of the cluster kind, fraction of the cold tokens (0 = off).
        cluster_budget_fraction: cold tokens the cluster kind selects per step, as a fraction of
            the clustered ones: per kv head with cluster_group_select (0.03), else per q head.
        cuda_device: the GPU backend's CUDA device ordinal (-1 = the current device), e.g. a
            tensor-parallel rank's own GPU.
        cluster_direct_step: 1 = the cluster kind's selection is attended on the GPU from the hot
            cache or straight from the host store over PCIe, with no CPU in the step (GPU backend;
            on by default since 0.3.4; 0 = the CPU orders the step, as before).
        worker_cpu_first: first CPU id of the range the runtime's worker threads run on.
        worker_cpu_count: CPUs in that range (worker_cpu_first .. worker_cpu_first + count - 1,
            Linux CPU ids, all online); 0 = not bound. Partitions a host's cores between runtimes,
            e.g. tensor-parallel ranks (kvrt.hf.cpu_share() computes a rank's share). The thread
            that calls kvrt keeps its own affinity (kvrt.h says why).
        cluster_group_select: 1 = one cluster selection per kv head, shared by its q heads
            (ranked by their summed shares of estimated mass); 0 = one per q head. Since 0.3.5.
        cluster_top_p: > 0 also ends a cluster selection once it holds this share of the
            estimated mass (0 = the budget alone). Since 0.3.5.
        cluster_miss_penalty: GPU backend, direct step with group selection: a cluster's
            selection key is lowered by this times the share of its rows not in the GPU hot
            cache, so that rows read over PCIe must carry more estimated mass (0 = off; finite,
            in [0, 64]). Since 0.3.9.
        cluster_keys: target keys per cluster of the cluster kind (a segment of cold tokens gets
            tokens / cluster_keys clusters): fewer keys rank the cold tokens better at more GPU
            memory for the summary (8 doubles 16's); in [2, 256] (0 = 16). Since 0.3.10.
        cluster_rescore: > 1 selects the cluster kind's rows in two stages: candidate clusters up
            to this multiple of the token budget, their keys scored exactly, the budget's best
            rows attended (the same rows attended, more keys read; the CPU selects then, no
            direct step); 0 or 1 = off; in [0, 64]. Since 0.3.11.
        cluster_rescore_bits: with cluster_rescore > 1, 0 scores the candidates on their keys;
            1, 2, 4 or 8 on codes of them (that many bits per channel of each key's residual
            from its cluster's centroid, kept in host memory), so that their keys are not read.
            Without cluster_rescore (0 or 1), 1-8 rank whole clusters by their rows' codes in
            one stage (on the GPU backend the codes are held and scanned in GPU memory; since
            0.3.14). Since 0.3.13.
        cluster_value_bits: with the one-stage selection on codes (cluster_rescore_bits 1-8,
            cluster_rescore 0 or 1), 1, 2, 4 or 8 estimate the clusters not attended from codes
            of their rows' values (that many bits per channel, in host memory), weighted by the
            rows' key-code scores, instead of each cluster's value mean; on the GPU backend
            2 bits (head_dim 64, 128 or 256, at most 8 q heads per kv head) run on the GPU
            beside the key codes (since 0.3.17; head_dim 256 since 0.3.18), other values make
            the CPU select (no direct step);
            0 = value means. Since 0.3.15.
        values_are_keys: 1 = each token's value is its key (v is not read; one row per token
            and kv head is stored instead of two), as for multi-head latent attention held as
            its latent (kvrt.hf); host backend only. Since 0.3.25.
    """

    num_layers: int = 32
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    dtype: Dtype = "bf16"
    scale: float = 0.0
    sink_tokens: int = 4
    window_tokens: int = 2048
    top_k: int = 100
    index_kind: str = "flat"
    search_effort: int = 0
    worker_threads: int = 0
    record_attended: int = 0
    use_gpu: int = 0
    host_memory_limit: int = 0
    gpu_memory_limit: int = 0
    check_finite: int = 1
    group_search: int = 0
    cold_attention: ColdAttention = "cpu"
    hot_cache_fraction: float = 0.1
    cluster_budget_fraction: float = 0.03
    cuda_device: int = -1
    cluster_direct_step: int = 1
    worker_cpu_first: int = 0
    worker_cpu_count: int = 0
    cluster_group_select: int = 1
    cluster_top_p: float = 0.0
    cluster_miss_penalty: float = 0.5
    cluster_keys: int = 16
    cluster_rescore: float = 0.0
    cluster_rescore_bits: int = 0
    cluster_value_bits: int = 0
    values_are_keys: int = 0

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Config":
        """A Config from a dict of kvrt_config fields (unknown keys raise TypeError)."""
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (unknown names raise TypeError)."""
        return dataclasses.replace(self, **changes)


ConfigLike = Union[Config, dict, None]


def make_config(config: ConfigLike = None, **overrides: Any) -> Config:
    """Config from a Config, a dict or None, then keyword overrides. Unknown names raise
    TypeError listing the valid ones."""
    if config is None:
        base = Config()
    elif isinstance(config, Config):
        base = config
    elif isinstance(config, dict):
        base = _checked(Config, config)
    else:
        raise TypeError(f"config must be a kvrt.Config or a dict, not {type(config).__name__}")
    return _checked(base.replace, overrides) if overrides else base


def _checked(factory, fields: dict[str, Any]) -> Config:
    unknown = sorted(set(fields) - set(Config.field_names()))
    if unknown:
        raise TypeError(f"unknown kvrt config field(s) {', '.join(unknown)}; the fields are "
                        f"{', '.join(Config.field_names())}")
    return factory(**fields)
