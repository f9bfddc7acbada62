"""Stats: kvrt_stats (api/include/kvrt.h) as a dataclass, with derived figures."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Stats:
    """A snapshot of kvrt_get_stats. Token counts are per layer, summed over layers and
    sequences; "so far" counters run from the runtime's creation; times are in ns. Field meanings
    are kvrt.h's."""

    sequences: int = 0
    gpu_tokens: int = 0
    host_tokens: int = 0
    gpu_bytes: int = 0
    host_bytes: int = 0
    index_bytes: int = 0
    attend_calls: int = 0
    keys_scored: int = 0
    cold_keys_searchable: int = 0
    cold_tokens_attended: int = 0
    evicted_tokens: int = 0
    gpu_allocated_bytes: int = 0
    time_attend_ns: int = 0
    time_gpu_attention_ns: int = 0
    time_d2h_ns: int = 0
    time_cpu_search_ns: int = 0
    time_cpu_attention_ns: int = 0
    time_h2d_ns: int = 0
    time_merge_ns: int = 0
    time_idle_ns: int = 0
    eviction_batches: int = 0
    index_update_failures: int = 0
    keys_read: int = 0
    attends_fetch: int = 0
    attends_gpu_select: int = 0
    summary_gpu_bytes: int = 0
    hot_hits: int = 0
    hot_misses: int = 0
    hot_h2d_bytes: int = 0
    hot_cache_gpu_bytes: int = 0
    time_hot_cache_ns: int = 0
    segments_built_gpu: int = 0
    time_segment_build_ns: int = 0
    attends_direct: int = 0
    direct_host_bytes: int = 0
    time_background_wait_ns: int = 0
    value_codes_fallbacks: int = 0
    evicted_in_place: int = 0

    @property
    def scanned_fraction(self) -> float:
        """keys_scored / cold_keys_searchable (0 before any search)."""
        return self.keys_scored / self.cold_keys_searchable if self.cold_keys_searchable else 0.0

    @property
    def mean_attend_us(self) -> float:
        """Wall time per layer attend inside the library, in microseconds."""
        return self.time_attend_ns / self.attend_calls / 1e3 if self.attend_calls else 0.0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __sub__(self, other: "Stats") -> "Stats":
        """The change between two snapshots (gauges such as gpu_tokens subtract too)."""
        return Stats(**{f.name: getattr(self, f.name) - getattr(other, f.name)
                        for f in fields(self)})
