/*
 * kvrt.h - the public C API of libkvrt.
 *
 * kvrt keeps the attention sinks (first tokens) and a recent window of every sequence's KV on the
 * GPU tier, moves every older key/value pair to host memory behind CPU-side indexes, and at each
 * decode step merges exact attention over the GPU tier with attention over the cold tokens the
 * index retrieves (log-sum-exp merge, exact up to rounding).
 *
 * Conventions
 *   - Every function returns a kvrt_status; results are written through out-parameters placed
 *     last. On failure, kvrt_last_error() describes the problem; outputs are left untouched and
 *     the runtime and sequence are left as they were before the call (no half-applied update).
 *   - Tensors are contiguous, row-major [tokens, heads, head_dim] in the config's dtype
 *     (queries too); attention outputs are f32 [q_heads, head_dim]. Pointers are host pointers
 *     unless a kvrt_exec says otherwise (the _ex calls below).
 *   - Ownership: kvrt copies what it keeps; no pointer passed in is retained after a call returns.
 *   - Handles: a kvrt_runtime* is valid from a successful kvrt_runtime_create until
 *     kvrt_runtime_destroy. Using it afterwards, or destroying it twice, is undefined behaviour;
 *     where the freed memory still holds kvrt's "destroyed" marker the call is refused with
 *     KVRT_ERR_INVALID_ARGUMENT (or, for destroy, ignored), which catches many such bugs but not
 *     all. A released or unknown kvrt_seq_id is always detected: KVRT_ERR_NOT_FOUND.
 *   - Non-finite values with check_finite = 0: a NaN (or an Inf that makes a score NaN) in q, or in
 *     the k or v of a token the attend uses, makes the output of every q head that attends to it
 *     NaN, never zeros: sinks, window and cold tokens alike, with every index kind and both
 *     backends. A cold token whose k or v holds a NaN/Inf is attended whatever the index returns
 *     (so a head may attend up to that many tokens more than top_k). A search shared by a group
 *     (group_search with landmark, the cluster kind's cluster_group_select) selects for the group
 *     together: a NaN in one q head's q, or a head set streaming, changes what its group's
 *     other heads attend (still finite).
 *   - Finite values past f32's range: scores and value sums are f32. A q.k beyond about 3.4e38
 *     before the scale, or values near 3.4e38 (a softmax-weighted sum of several overflows), give
 *     Inf or NaN outputs although every input is finite; check_finite checks the inputs, not
 *     these products. Models' activations are many orders of magnitude smaller.
 *
 * Limits (KVRT_ERR_INVALID_ARGUMENT outside them, naming the field)
 *   num_layers 1..4096, num_kv_heads 1..1024, num_q_heads 1..4096 (a multiple of num_kv_heads),
 *   head_dim 1..1024, sink_tokens 0..2^20, window_tokens 1..2^24, top_k 1..2^20 (for every index
 *   kind, EXACT included, which ignores it), search_effort 0..2^24, worker_threads >= 0 (above the
 *   hardware thread count: clamped to it), worker_cpu_first and worker_cpu_count >= 0 (the range
 *   online), host/gpu_memory_limit >= 0, cluster_keys 0 or 2..256, cluster_rescore 0..64,
 *   cluster_rescore_bits 0/1/2/4/8, cluster_value_bits 0/1/2/4/8 (non-zero only with
 *   cluster_rescore_bits non-zero and cluster_rescore 0 or 1), values_are_keys 0/1, tokens
 * per (sequence, layer) up to 2^34 (a prefill or append past it is refused).
 *
 * Thread safety
 *   - kvrt_runtime_create/destroy: not concurrent with any other call on the same runtime.
 *   - Calls on *different* sequences of one runtime may run concurrently from different threads.
 *   - Calls on the *same* sequence must be serialised by the caller (one decoder thread per
 *     sequence is the intended use). kvrt_seq_release counts as a call on its sequence;
 *     kvrt_seq_create, kvrt_get_stats, kvrt_runtime_config and kvrt_prefill_query_rows may run
 *     concurrently with anything but create/destroy. kvrt_set_head_policy and
 *     kvrt_set_search_effort: not concurrent with an attend on any sequence, nor with
 *     kvrt_runtime_describe_search.
 *   - kvrt_last_error() is per thread.
 *   - kvrt uses its own oneTBB task arena (worker_threads) for search and CPU attention, and
 *     for the background jobs of prefills (the index builds: kvrt_seq_wait); worker_cpu_first/count
 *     bind its threads to a range of CPUs.
 *
 * ABI (since 0.3)
 *   kvrt_config and kvrt_stats start with size_t struct_size, which the caller sets (through
 *   kvrt_config_default(), kvrt_config_init() or kvrt_stats_init()) to the size its kvrt.h
 *   declares. Fields are only ever appended; the library accepts every size that a kvrt.h since
 *   0.3 declared, reads and writes only that prefix (fields a caller's older header lacks keep
 *   their defaults), and refuses an unknown size with KVRT_ERR_INVALID_ARGUMENT before touching
 *   the struct. kvrt_exec never grows. While the major version is 0 each minor version that
 *   changes the ABI gets its own soname (libkvrt.so.0.3); 0.3 is the first with struct_size, so a
 *   binary built against 0.2 keeps loading libkvrt.so.0, and a program compiled against the 0.2
 *   header but linked against this library gets KVRT_ERR_INVALID_ARGUMENT from
 *   kvrt_runtime_create (tests/api/abi).
 */
#ifndef KVRT_H_
#define KVRT_H_

#include <stddef.h>
#include <stdint.h>

/* A caller may define KVRT_API itself (empty, say, for a static build or a binding generator). */
#ifndef KVRT_API
#if defined(_WIN32)
#if defined(KVRT_BUILDING)
#define KVRT_API __declspec(dllexport)
#else
#define KVRT_API __declspec(dllimport)
#endif
#else
#define KVRT_API __attribute__((visibility("default")))
#endif
#endif

#define KVRT_VERSION_MAJOR 0
#define KVRT_VERSION_MINOR 3
#define KVRT_VERSION_PATCH 37

#ifdef __cplusplus
extern "C" {
#endif

/* ---- status ---------------------------------------------------------------------------------- */

typedef enum kvrt_status {
  KVRT_OK = 0,
  KVRT_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a shape or a value out of range */
  KVRT_ERR_NOT_FOUND = 2,        /* unknown or released sequence */
  KVRT_ERR_OUT_OF_MEMORY = 3,    /* an allocation or a configured memory budget failed */
  KVRT_ERR_FAILED_PRECONDITION =
      4,                      /* the call is valid but not in this state (e.g. prefill twice) */
  KVRT_ERR_UNIMPLEMENTED = 5, /* a feature this build does not have (e.g. no CUDA) */
  KVRT_ERR_INTERNAL = 6,      /* a bug in kvrt: please report it with kvrt_last_error() */
  KVRT_ERR_CUDA = 7,          /* reserved, not returned: a CUDA runtime error on the GPU backend
                                 is KVRT_ERR_INTERNAL, its message naming the CUDA call and error */
  KVRT_ERR_IO = 8             /* reserved, not returned (no call reads or writes files) */
} kvrt_status;

/* A static string naming the status ("KVRT_OK", ...). Never NULL. */
KVRT_API const char* kvrt_status_string(kvrt_status status);

/* The message of the last failed kvrt call on this thread ("" if none). Valid until the next kvrt
 * call on this thread. */
KVRT_API const char* kvrt_last_error(void);

/* "MAJOR.MINOR.PATCH" of the library actually loaded. */
KVRT_API const char* kvrt_version(void);

/* ---- configuration --------------------------------------------------------------------------- */

typedef enum kvrt_dtype { KVRT_DTYPE_F32 = 0, KVRT_DTYPE_F16 = 1, KVRT_DTYPE_BF16 = 2 } kvrt_dtype;

typedef enum kvrt_index_kind {
  KVRT_INDEX_EXACT = 0,           /* attend to every cold token (no index; ground truth) */
  KVRT_INDEX_FLAT = 1,            /* exact top-k cold tokens by score (full scan) */
  KVRT_INDEX_IVF = 2,             /* FAISS IVF, inner product */
  KVRT_INDEX_HNSW = 3,            /* hnswlib HNSW, inner product */
  KVRT_INDEX_LANDMARK = 4,        /* blocks of tokens with score bounds, exact inside the best */
  KVRT_INDEX_ATTENTION_AWARE = 5, /* query-aware key graph (RetrievalAttention style) */
  KVRT_INDEX_CLUSTER = 6          /* two-level: keys clustered per segment (query-aware k-means),
                                     store laid out by cluster; centroids scored, the best clusters
                                     attended within a token budget (max(top_k, 3% of the clustered
                                     keys, 256) per kv head: cluster_budget_fraction), the rest
                                     estimated. Since 0.3 */
} kvrt_index_kind;

/* The kinds this library knows, by name ("exact", "flat", "ivf", "hnsw", "landmark",
 * "attention-aware", ...): kvrt_index_kind_count() kinds, numbered 0 .. count - 1.
 * kvrt_index_kind_name returns a static string, or NULL for an unknown kind. kvrt_index_kind_parse
 * accepts the names above: KVRT_ERR_INVALID_ARGUMENT (message lists the names) otherwise.
 * Thread-safe. Since 0.3. */
KVRT_API int32_t kvrt_index_kind_count(void);
KVRT_API const char* kvrt_index_kind_name(kvrt_index_kind kind);
KVRT_API kvrt_status kvrt_index_kind_parse(const char* name, kvrt_index_kind* out);
/* The search settings `kind` resolves for top_k and search_effort (0 = the kind's default), in
 * words, e.g. "nprobe=16+ (lists holding >= 3000 keys)" or "ef=1000": what a report should print
 * so that effort 0 never hides what the default does at this k (the other fields as
 * kvrt_config_default() sets them, e.g. the cluster kind's budget). Writes a NUL-terminated string
 * of at most size bytes to buf (truncated); buf NULL or size 0 (no room for the NUL) ->
 * KVRT_ERR_INVALID_ARGUMENT. top_k and search_effort in kvrt_runtime_create's ranges
 * ([1, 2^20], [0, 2^24]; KVRT_ERR_INVALID_ARGUMENT otherwise, since 0.3.23). Thread-safe. Since
 * 0.3. */
KVRT_API kvrt_status kvrt_index_describe_search(kvrt_index_kind kind, int32_t top_k,
                                                int32_t search_effort, char* buf, size_t size);

/* Where the retrieved cold tokens are attended (GPU backend; the host backend always uses the CPU).
 */
typedef enum kvrt_cold_attention {
  KVRT_COLD_CPU = 0,   /* CPU attention over the retrieved rows; (o, lse) go H2D for the merge */
  KVRT_COLD_FETCH = 1, /* fetch mode: the retrieved K/V rows are gathered into pinned memory, copied
                          H2D, and attended on the GPU (gather-attend kernel) */
  KVRT_COLD_AUTO = 2   /* per (sequence, layer): whichever mode measured cheaper (attend wall time,
                          moving average), re-trying the other one every 32 attends */
} kvrt_cold_attention;

/* Fields are only ever appended. Get defaults from kvrt_config_default() (or kvrt_config_init()),
 * then change fields; struct_size, set by both, tells the library which kvrt.h the caller was
 * compiled against (see "ABI" below). */
typedef struct kvrt_config {
  size_t struct_size; /* sizeof(kvrt_config) of the caller's kvrt.h. Since 0.3. */
  /* Defaults (kvrt_config_default) in brackets; ranges under "Limits" above. */
  int32_t num_layers;         /* attention layers of the decoder [32] */
  int32_t num_q_heads;        /* query heads; a multiple of num_kv_heads [32] */
  int32_t num_kv_heads;       /* key/value heads (GQA group = num_q_heads / num_kv_heads) [8] */
  int32_t head_dim;           /* [128] */
  kvrt_dtype dtype;           /* storage dtype of k, v (and of q passed in); accumulation is f32
                                 [KVRT_DTYPE_BF16] */
  float scale;                /* score scale; 0 means 1/sqrt(head_dim) [0] */
  int32_t sink_tokens;        /* first tokens always kept on the GPU tier [4]; their buffers
                                 (sink_tokens x num_kv_heads x head_dim, K and V) are allocated
                                 whole at a (sequence, layer)'s first token and counted in
                                 gpu_memory_limit, unlike the window, which grows as it fills */
  int32_t window_tokens;      /* most recent tokens kept on the GPU tier [2048]. The host backend
                                 allocates the window as it fills (doubling); the GPU backend
                                 allocates all of it per (sequence, layer) at its first token
                                 (counted in gpu_memory_limit and gpu_allocated_bytes). */
  int32_t top_k;              /* cold tokens retrieved per q head and step [100]; EXACT attends to
                                 every cold token and ignores it (it must still be in range) */
  kvrt_index_kind index_kind; /* [KVRT_INDEX_FLAT] */
  int32_t search_effort;      /* index-specific search effort; 0 = the kind's default, which scales
                                 with top_k [0]:
                                   IVF: nprobe; default 16 lists, grown until the probed lists hold
                                     3 * top_k keys; any nprobe is grown until they hold top_k keys,
                                     so a search returns top_k results.
                                   HNSW: ef = max(top_k, effort); default max(top_k, 128). top_k or
                                     ef >= the cold keys, or a graph that reaches fewer than top_k
                                     keys, is an exact scan.
                                   LANDMARK: blocks of 32 tokens, at least enough for top_k tokens
                                     (since 0.3.37); default enough for 4 * top_k tokens.
                                   ATTENTION_AWARE: beam = max(top_k, effort); default 2 * top_k.
                                   FLAT, EXACT: ignored (exact).
                                 kvrt replay prints the resolved values ("search" line). */
  int32_t worker_threads;     /* CPU threads for search/attention; 0 = all hardware threads
                                 (worker_cpu_count when that is set); more than the hardware has
                                 are clamped to it [0]. kvrt_runtime_config reports the count in
                                 effect. */
  int32_t record_attended;    /* 1: remember the token positions each attend used, for
                                 kvrt_get_attended (replay metrics); costs time and memory [0] */
  int32_t use_gpu;            /* 0: host backend; 1: GPU tier on CUDA: sinks + window in device
                                 memory, cold side on the CPU overlapped with GPU attention
                                 (KVRT_ERR_UNIMPLEMENTED without a CUDA device or a CUDA build,
                                 KVRT_ERR_INVALID_ARGUMENT for a head_dim past 256). A
                                 head_dim other than 64/128/256 (Phi-3-mini's 96) runs padded
                                 with zeros to the next of them: same results, the wider rows'
                                 memory (counted in the stats and limits), a few stream-ordered
                                 copies per call (since 0.3.22). Any q heads per kv head, with
                                 the cluster kind's GPU selection (and direct step) up to 16 and
                                 the CPU's beyond (since 0.3.22). -1: GPU when available and
                                 supported, else host. kvrt_runtime_config reports 0 or 1 (and
                                 the caller's head_dim). [0] */
  int64_t host_memory_limit;  /* bytes of host KV store + indexes, all sequences; 0 = no limit [0].
                                 Past it, prefill/append return KVRT_ERR_OUT_OF_MEMORY and change
                                 nothing. A call that grows a cold index reserves an upper bound
                                 of that growth first (the stats then show the real size, which is
                                 lower), so store + indexes never pass the limit and a call may be
                                 refused somewhat before the real total would. GPU backend: the
                                 index growth of rows evicted by decode appends, indexed in the
                                 background, is counted when that insert completes. */
  int64_t gpu_memory_limit;   /* bytes of GPU-tier buffers (sinks + window ring per layer), all
                                 sequences; 0 = no limit [0]. Same behaviour. */
  int32_t check_finite;       /* 1: reject q, k, v holding NaN or Inf with KVRT_ERR_INVALID_ARGUMENT
                                 naming the tensor, token and head (costs one pass over the input);
                                 0: no check: a NaN propagates into the outputs of the heads that
                                 attend to it (see "Non-finite values" above) [1]. */
  int32_t group_search;       /* GQA: 1 = one index search per kv head for all q heads of its group
                                 (each q head then takes its own top_k of the keys that search
                                 scored; attention-aware and landmark share the work, and the
                                 cluster kind selecting on codes (cluster_rescore_bits without
                                 cluster_rescore: one pass over the codes scores the group's
                                 heads, each still selecting alone, since 0.3.15); the other
                                 kinds search per q head anyway); 0 = one search per q head.
                                 Default 0: lower latency for one sequence on 16 cores; 1 reads
                                 fewer keys per recall and does less work when many sequences
                                 attend at once (docs/benchmarks.md, "GQA group search"). Since 0.2. */
  int32_t cold_attention;     /* a kvrt_cold_attention; default KVRT_COLD_CPU. EXACT index kind
                                 always attends on the CPU (it would fetch every cold token).
                                 Fetch mode keeps a pinned staging block per (sequence, layer) of
                                 about 2 * q_heads * top_k * head_dim * dtype bytes (1.6 MiB at
                                 32 heads, k = 100, d = 128, bf16), not counted in
                                 host_memory_limit. Since 0.2. */
  float hot_cache_fraction;   /* GPU backend, KVRT_INDEX_CLUSTER: a GPU hot cache per (sequence,
                                 layer) of the cold rows that recent steps selected, sized to this
                                 fraction of the layer's cold tokens (re-sized as the cold tier
                                 grows; with cluster_direct_step, pages of 8 rows under a CLOCK
                                 policy, plus room for the rows not yet clustered, at most a
                                 segment, since 0.3.22; else of 16 rows with LRU eviction of
                                 clusters). Selected
                                 clusters, outliers and not yet clustered rows are attended on the
                                 GPU from it; only the rows a step selects that are not cached
                                 cross PCIe. A batch's members share one PCIe link, so a batch
                                 gains most from a larger cache (docs/benchmarks.md: B=16 x 128K
                                 at 0.2 about 20% faster than at 0.1, for 64 MiB more per
                                 (sequence, layer)). It takes only what gpu_memory_limit leaves:
                                 without room, the step attends on the CPU as with 0. Counted in
                                 gpu_allocated_bytes and hot_cache_gpu_bytes. 0 = off; in [0, 1]
                                 [0.1]. Since 0.3.1. */
  float cluster_budget_fraction; /* KVRT_INDEX_CLUSTER: cold tokens selected per step, as a
                                    fraction of the clustered cold tokens (at least top_k and
                                    256): the best clusters up to that many tokens, plus the
                                    outliers and the rows not clustered yet. Per kv head with
                                    cluster_group_select (the default since 0.3.5: [0.03]), per
                                    q head without it (0.3.1-0.3.4: per q head, 0.02); in (0, 1].
                                    Since 0.3.1. */
  int32_t cuda_device;           /* GPU backend: the CUDA device ordinal this runtime uses (its
                                    buffers, streams and kernels; the kvrt_exec streams passed to it
                                    must belong to it); -1 = the creating thread's current device.
                                    Several runtimes, in one process or several, can each use their
                                    own GPU (one runtime per tensor-parallel rank). A value >= the
                                    visible device count: KVRT_ERR_INVALID_ARGUMENT with use_gpu = 1,
                                    the host backend with -1. kvrt_runtime_config reports the ordinal
                                    in effect on the GPU backend (on the host backend, the value
                                    given: no device is used) [-1]. Since 0.3.1. */
  int32_t cluster_direct_step; /* GPU backend, KVRT_INDEX_CLUSTER with hot_cache_fraction > 0: 1 =
                                  the direct step: the clusters the GPU selects are attended on
                                  the GPU too, each row read from the hot cache or, when it is
                                  not there, straight from the host store over PCIe (the store is
                                  registered as mapped host memory), so that a decode step never
                                  waits for the CPU; which 8-row blocks the cache holds follows
                                  the previous step's selection (CLOCK). 0 = the CPU orders the
                                  step (looks the selection up, gathers the misses, copies them).
                                  Falls back to 0 for a layer whose store cannot be registered
                                  or whose cache does not fit gpu_memory_limit. On by default
                                  since 0.3.4 (0.3.3: off, while an end-to-end regression was
                                  open; docs/benchmarks.md, "The direct step") [1]. Since 0.3.3. */
  /* CPU partitioning between runtimes (e.g. one per tensor-parallel rank on one host): the
   * runtime's worker threads run on the CPUs worker_cpu_first .. worker_cpu_first +
   * worker_cpu_count - 1 (Linux CPU ids, as `taskset -c` and /sys/devices/system/cpu number them).
   * worker_threads 0 then means worker_cpu_count threads. A oneTBB worker is pinned to the range
   * while it works for this runtime and gets its own CPU set back when it leaves (oneTBB's
   * workers are shared by the whole process). The thread that calls kvrt keeps its affinity:
   * oneTBB keeps one of the worker_threads slots for it and it runs part of its own call's work,
   * so worker_threads - 1 threads are pinned; a decoder that wants all of a rank's kvrt work on
   * the range pins its own thread too (taskset, numactl, os.sched_setaffinity). Every CPU of the
   * range must be online and usable by the process (a cgroup cpuset may exclude some):
   * KVRT_ERR_INVALID_ARGUMENT naming the field otherwise, also for first + count past INT32_MAX.
   * NUMA: kvrt binds threads only; it does not place host memory (the host store, pinned
   * buffers) on a node and does not link libnuma: pick a range on the GPU's node (`nvidia-smi topo
   * -m` lists each GPU's CPUs) and, for the memory, run the process under `numactl --membind`.
   * kvrt_runtime_config reports both fields as given and worker_threads in effect. Since 0.3.4. */
  int32_t worker_cpu_first; /* first CPU id of the range, >= 0; no binding while worker_cpu_count
                               is 0 [0] */
  int32_t worker_cpu_count; /* CPUs in the range; 0 = not bound: the threads run wherever the
                               process may run [0] */
  int32_t cluster_group_select; /* KVRT_INDEX_CLUSTER: 1 = one selection per kv head, shared by
                                   the q heads of its group: clusters ranked by their share of
                                   each head's estimated attention mass, summed over the group,
                                   and cluster_budget_fraction counts the rows read once per kv
                                   head (what a step moves or scans), not per q head; every head
                                   still attends them exactly and estimates the rest with its own
                                   scores. 0 = each q head selects its own clusters (the group
                                   then reads up to group x the budget). At equal rows read per
                                   kv head the shared selection had the same or a lower error on
                                   the traces of docs/fidelity.md ("Group selection") [1]. Since
                                   0.3.5. */
  float cluster_top_p;          /* KVRT_INDEX_CLUSTER: > 0 also ends a selection once its
                                   clusters hold this share of the estimated mass (Twilight-style
                                   top-p; whichever of budget and top-p comes first); 0 = the
                                   budget alone; in [0, 1] [0]. Since 0.3.5. */
  float cluster_miss_penalty;   /* GPU backend, KVRT_INDEX_CLUSTER, cluster_direct_step = 1 and
                                   cluster_group_select = 1: each cluster's group selection key is
                                   lowered by this times the share of its rows not resident in
                                   the step's GPU page pool (the hot cache), so that a cluster
                                   read over PCIe needs more estimated attention mass than one
                                   read from HBM. At 128K on the H200 0.5 cut the rows read over
                                   PCIe per step by 35% (B=16 x 128K -13 to -21% per layer-step),
                                   1.0 by 59% (-25 to -32%); in CPU replays on real traces 0.5 cost
                                   +0.5-4% mean output error, 1.0 +6-10% (docs/cluster.md,
                                   "Residency-aware selection"). No effect on
                                   the host backend (no pool) or without group selection.
                                   0 = off; finite, in [0, 64] [0.5]. Since 0.3.9. */
  int32_t cluster_keys;         /* KVRT_INDEX_CLUSTER: target keys per cluster (a segment of cold
                                   tokens gets tokens / cluster_keys clusters). Fewer keys per
                                   cluster: a finer summary that ranks the cold tokens better, at
                                   more GPU memory and scoring time (the summary's bytes scale
                                   with 1 / cluster_keys: 8 keys doubles 16's). On the Gemma 3
                                   32K traces 8 keys cut the mean output error at equal attended
                                   tokens by 12-26% against 16 (docs/fidelity.md, "Smaller
                                   clusters at equal tokens"). 0 = 16 (0.3.9's reserved0, which
                                   kvrt_config_default() set to 0, so a 0.3.9 caller gets 16);
                                   in [0, 256], 1 excluded [16]. Since 0.3.10 (0.3.9: reserved0,
                                   not read, which kept sizeof(kvrt_config) apart from
                                   0.3.5-0.3.8's, whose tail padding holds cluster_miss_penalty:
                                   see "ABI"). */
  float cluster_rescore;        /* KVRT_INDEX_CLUSTER: > 1 selects in two stages: clusters up to
                                   cluster_rescore x the token budget are candidates, their keys
                                   are scored exactly, and the budget's best rows are attended
                                   (with group selection: by the sum of the group's q heads'
                                   shares of the candidates' exact mass); the candidates' other
                                   rows join the estimate at their exact mass with their mean
                                   value. The rows attended stay the budget's; the keys read per
                                   step grow to cluster_rescore x it (kvrt_stats.scanned counts
                                   them). On the Gemma 3 traces 4 cut the mean output error at
                                   equal attended tokens to 0.38-0.60x flat top-k's per q head
                                   and 0.57-0.79x with group selection (docs/fidelity.md,
                                   "Two-stage selection"). The selection then runs on the CPU: the
                                   GPU backend's selection kernels and the direct step do not
                                   rescore (kvrt_runtime_config reports cluster_direct_step 0).
                                   0 or 1 = off; finite, in [0, 64] [0]. Since 0.3.11. */
  int32_t cluster_rescore_bits; /* KVRT_INDEX_CLUSTER with cluster_rescore > 1: 0 scores the
                                   candidates on their keys; 1, 2, 4 or 8 on compact codes of
                                   them instead: per channel that many bits of the key's residual
                                   from its cluster's centroid (per-segment grids), kept beside
                                   the index in host memory (head_dim x bits / 8 bytes per cold
                                   token and kv head). The candidates' keys are then not read;
                                   the attended rows still are, exactly. On the Gemma 3 traces 2
                                   bits keep nearly all of the keys' gain (error at equal tokens
                                   0.41-0.62x flat top-k's per q head at cluster_rescore 4
                                   against 0.38-0.60x on keys), and scoring every clustered row
                                   (cluster_rescore 64) on them gives 0.23-0.32x per q head,
                                   0.34-0.50x with group selection (docs/fidelity.md,
                                   "Candidates scored on codes"). On the host's CPU the codes
                                   are no faster than the keys (measured on 2 cores); they are
                                   the form a GPU scan would read.
                                   With cluster_rescore 0 or 1 (since 0.3.14; 0.3.13 ignored
                                   the bits there), 1-8 select in one stage on codes: each
                                   cluster's mass is the log-sum-exp of its rows' code scores
                                   instead of its centroid's estimate, clusters are ranked by it
                                   per token and attended whole up to the token budget, and the
                                   rest are estimated at that mass (cluster_top_p does not
                                   apply). On the GPU backend the codes are held in GPU memory
                                   beside the summary (head_dim x bits / 8 bytes per cold token
                                   and kv head; counted in
                                   kvrt_stats.summary_gpu_bytes) and scanned there, so the GPU
                                   selection and the direct step stay on (the scan adds ~140 us
                                   per 128K layer-step on an H100 at the 8B shape:
                                   docs/benchmarks.md), for a head_dim that is a multiple of 32;
                                   another head_dim selects on the CPU, as cluster_rescore does
                                   (kvrt_runtime_config reports cluster_direct_step 0; since
                                   0.3.15: 0.3.14's attends returned an error). Whole clusters
                                   ranked on 2-bit codes: 0.46-0.78x flat top-k's error per q head,
                                   0.66-0.98x with group selection, against 0.83-1.19x and
                                   0.98-1.36x for the centroids (docs/fidelity.md). One of 0, 1,
                                   2, 4, 8 [0]. Since 0.3.13 (0.3.11 and 0.3.12: reserved1, not
                                   read, which kvrt_config_default() set to 0: such a caller
                                   scores on keys, as before). */
  int32_t cluster_value_bits;   /* KVRT_INDEX_CLUSTER selecting on codes (cluster_rescore_bits
                                   1-8, cluster_rescore 0 or 1): 1, 2, 4 or 8 estimates the
                                   clusters not attended from their rows' values too: each cold
                                   value coded on that many bits per channel of its residual from
                                   its cluster's value mean (in host memory beside the key codes:
                                   head_dim x bits / 8 bytes per cold token and kv head), the
                                   estimate the softmax of the rows' key-code scores over their
                                   decoded values instead of each cluster's value mean at its
                                   mass. On the Gemma 3 traces at 2 bits: 0.41-0.53x flat top-k's
                                   error at equal tokens with group selection (0.64-0.98x with the
                                   value means), 0.28-0.42x per q head (docs/fidelity.md, "The
                                   rest estimated from value codes"). On the GPU backend, 2-bit
                                   value codes at head_dim 64, 128 or 256 with at most 8 q heads
                                   per kv head are held in GPU memory beside the key codes and the
                                   selection and estimate run there (since 0.3.17; head_dim 256
                                   since 0.3.18); other
                                   settings select on the CPU (kvrt_runtime_config reports
                                   cluster_direct_step 0).
                                   0 = value means; another value, or one without the selection
                                   on codes: KVRT_ERR_INVALID_ARGUMENT [0]. Since 0.3.15. */
  int32_t values_are_keys;      /* 1: each token's value is its key: v is not read (NULL
                                   allowed in kvrt_append / kvrt_prefill) and the host store and
                                   tier hold one row per token and kv head instead of two, so
                                   an output is the attention-weighted sum of keys. For
                                   multi-head latent attention held as its latent (kvrt.hf's
                                   default), whose values are its keys' first kv_lora_rank
                                   dims: DeepSeek-V3 holds 576 values per token and layer.
                                   Host backend only (use_gpu 1 with it:
                                   KVRT_ERR_INVALID_ARGUMENT; -1 takes the host). 0 or 1 [0].
                                   Since 0.3.25 (0.3.15 to 0.3.24: reserved2, not read, which
                                   kvrt_config_default() set to 0: such a caller stores
                                   values, as before). */
} kvrt_config;

/* Fills the first struct_size bytes of *config with the defaults listed above each field and sets
 * config->struct_size = struct_size. KVRT_ERR_INVALID_ARGUMENT for NULL or a size that no kvrt.h
 * since 0.3 declared. Since 0.3. */
KVRT_API kvrt_status kvrt_config_init(kvrt_config* config, size_t struct_size);

/* The defaults, with struct_size set to this header's sizeof(kvrt_config). Inline (it returns the
 * struct by value, so the caller's compiled size must decide the size: a library function would
 * write its own, possibly larger, struct into the caller's). */
static inline kvrt_config kvrt_config_default(void) {
  kvrt_config c;
  (void)kvrt_config_init(&c, sizeof c);
  return c;
}

/* ---- runtime and sequences ------------------------------------------------------------------- */

typedef struct kvrt_runtime kvrt_runtime; /* opaque */
typedef int64_t kvrt_seq_id;

/* Validates config (its struct_size first, see "ABI") and creates a runtime in *out. On failure
 * *out is untouched. */
KVRT_API kvrt_status kvrt_runtime_create(const kvrt_config* config, kvrt_runtime** out);

/* Frees everything the runtime holds. Accepts NULL. Not concurrent with other calls on rt. */
KVRT_API void kvrt_runtime_destroy(kvrt_runtime* rt);

/* The effective configuration (defaults resolved: scale, worker_threads, use_gpu); writes the
 * first out->struct_size bytes (set it, e.g. with kvrt_config_default(), first). */
KVRT_API kvrt_status kvrt_runtime_config(const kvrt_runtime* rt, kvrt_config* out);

/* kvrt_index_describe_search for a runtime: the search its config resolves (its index kind,
 * top_k, per-kind fields such as the cluster kind's keys per cluster, group selection and
 * two-stage rescore), at the search_effort in effect (kvrt_set_search_effort). Since 0.3.12. */
KVRT_API kvrt_status kvrt_runtime_describe_search(const kvrt_runtime* rt, char* buf, size_t size);

/* Creates an empty sequence (all layers empty) and returns its id (>= 0, never reused). Allocates
 * nothing per layer until the layer's first token. */
KVRT_API kvrt_status kvrt_seq_create(kvrt_runtime* rt, kvrt_seq_id* out);

/* Frees a sequence's KV in every tier. KVRT_ERR_NOT_FOUND if unknown or already released. */
KVRT_API kvrt_status kvrt_seq_release(kvrt_runtime* rt, kvrt_seq_id seq);

/* Waits for the sequence's background work on every layer: a prefill returns before its index is
 * built, and on the GPU backend from device pointers before its cold rows reach the host store
 * (they overlap the caller's next layers; the next call on that layer waits for them). Returns the
 * error of a layer whose rows could not be stored (they stay staged and are retried by its next
 * call; nothing is lost). Not needed for correctness; for timing and to free the staging early.
 * Since 0.3.2. */
KVRT_API kvrt_status kvrt_seq_wait(kvrt_runtime* rt, kvrt_seq_id seq);

/* Number of tokens the layer of the sequence holds (all tiers). */
KVRT_API kvrt_status kvrt_seq_length(const kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                                     int64_t* out);

/* ---- KV and attention ------------------------------------------------------------------------ */

/* The prompt of one layer: k, v [n_tokens, kv_heads, head_dim] (v not read, and may be NULL, with
 * config.values_are_keys); q [n_tokens, q_heads, head_dim] may be NULL (the attention-aware index
 * then builds from keys alone). n_tokens >= 1 (KVRT_ERR_INVALID_ARGUMENT otherwise). The layer must
 * be empty (KVRT_ERR_FAILED_PRECONDITION otherwise). Keeps sinks and window on the GPU tier, moves
 * the rest to the host store and builds the cold index (no index below 256 cold tokens: they are
 * scanned exactly). The call returns once the rows are stored (q, k, v are not read after it);
 * the index is built in a background job on the runtime's workers, which overlaps the caller's
 * next work (the next layers) and which the next call on this (seq, layer), or kvrt_seq_wait,
 * waits for (joining it: the waiting thread runs the build's tasks). The index does not depend on
 * when it is built, so neither do results; except KVRT_INDEX_HNSW's and KVRT_INDEX_IVF's, which
 * hnswlib's parallel inserts and FAISS's threads make depend on the threads' timing (two builds
 * of the same keys may differ; docs/fidelity.md). Since 0.3.28 on the host backend and for host pointers
 * (before, the call built it); for device pointers since 0.3.2. */
KVRT_API kvrt_status kvrt_prefill(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                                  const void* k, const void* v, int64_t n_tokens);

/* Appends n_tokens >= 1 tokens (k, v [n_tokens, kv_heads, head_dim]; v as in kvrt_prefill).
 * Tokens leaving the window are evicted to the host store and inserted into the cold index. */
KVRT_API kvrt_status kvrt_append(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* k,
                                 const void* v, int64_t n_tokens);

/* One decode query q [q_heads, head_dim] over every token the layer holds (the caller appends the
 * current token's k, v first). Writes out [q_heads, head_dim] f32. KVRT_ERR_FAILED_PRECONDITION
 * if the layer holds no token. */
KVRT_API kvrt_status kvrt_attend(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                                 float* out);

/* A batched decode step of one layer: kvrt_attend for n_seqs >= 1 distinct sequences, q
 * [n_seqs, q_heads, head_dim] (row i belongs to seqs[i]), out [n_seqs, q_heads, head_dim] f32.
 * Runs as one parallel loop over the sequences on the runtime's worker threads, so a batch needs
 * no caller thread per sequence (docs/benchmarks.md measures both). Errors of the whole call (a
 * NULL pointer, n_seqs < 1, a layer out of range, a sequence listed twice, a non-finite q with
 * check_finite) follow the general rule: nothing is written. Errors of one sequence (unknown or
 * released: KVRT_ERR_NOT_FOUND; an empty layer: KVRT_ERR_FAILED_PRECONDITION; any failure of its
 * attend) are the exception to that rule: that sequence's row is untouched, every other row is
 * written and its sequence updated as by kvrt_attend, and the status is the first failing
 * sequence's (in seqs order); kvrt_last_error() names that sequence's id (the status itself does
 * not say which). Since 0.2. */
KVRT_API kvrt_status kvrt_attend_batch(kvrt_runtime* rt, const kvrt_seq_id* seqs, int32_t n_seqs,
                                       int32_t layer, const void* q, float* out);

/* Token positions (0-based, in sequence order of arrival) that the last kvrt_attend on (seq,
 * layer) used for q head `q_head`: GPU tier first, then retrieved cold tokens. Needs
 * config.record_attended = 1 (KVRT_ERR_FAILED_PRECONDITION otherwise, and before any
 * attend on that (seq, layer)). Writes min(count, capacity) ids and the full count in
 * *count. */
KVRT_API kvrt_status kvrt_get_attended(const kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                                       int32_t q_head, int64_t* ids, int64_t capacity,
                                       int64_t* count);

/* The log-sum-exp (natural log, scaled scores) that the last kvrt_attend on (seq, layer) added
 * for q head `q_head` as the estimate of the cold tokens it did not attend (KVRT_INDEX_CLUSTER;
 * -INFINITY when there was none: another kind, estimation off, nothing left out). With the
 * exact lse over all tokens, exp(estimate - exact) is the share of the attention mass the
 * estimate claims, to set beside the mass the attended tokens missed (kvrt replay's
 * estimated_mass). Same preconditions as kvrt_get_attended. Since 0.3.3. */
KVRT_API kvrt_status kvrt_get_estimate_lse(const kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                                           int32_t q_head, float* lse);

/* ---- execution context (device pointers, CUDA stream) ----------------------------------------
 * The _ex variants take where the tensors live and which stream orders the work. With
 * exec = NULL, or memory = KVRT_MEMORY_HOST and cuda_stream = NULL, they are the plain calls
 * above.
 * KVRT_MEMORY_DEVICE needs the CUDA backend (use_gpu = 1 in effect; KVRT_ERR_UNIMPLEMENTED
 * otherwise). Device tensors are read in stream order on cuda_stream (a cudaStream_t passed as
 * void* so this header compiles without CUDA; NULL = the legacy default stream):
 *   - append/prefill: new k, v are copied into the device window and the cold part to the host
 *     store; the call returns without waiting for the GPU. A prefill's cold part (a prompt longer
 *     than the window) is copied device to device into staging and reaches the host store, and
 *     its index, in a background job that overlaps the caller's next work (the next layers'
 *     prefill); the next call on that (seq, layer), or kvrt_seq_wait, waits for it. The query
 *     sample of kinds that build from queries is staged the same way (in earlier builds of 0.3.4
 *     the prefill waited for the stream's earlier work to copy it to the host). At most two
 *     prompts per runtime are staged at once (a third prefill waits for one of them); the
 *     staging (2 x the cold part's bytes) and the cluster kind's GPU build borrow device memory
 *     outside gpu_memory_limit for that time (since 0.3.2; before, a prefill waited for its cold
 *     part's D2H and index). An append of more tokens than the window waits for the D2H of its
 *     cold part.
 *   - attend: where a phase runs on the CPU, q is copied D2H on the stream (small) and the call
 *     waits for it; the cluster kind's direct step (cluster_direct_step, the default) does not:
 *     its selection and attention stay on the device and the call returns without waiting.
 *     out (device, f32 [q_heads, head_dim]) is written in stream order when the call returns,
 *     with no device-wide synchronisation: the caller's later work on cuda_stream sees it.
 * With host pointers the GPU backend uses its own streams and an attend returns with out written.
 * CUDA graphs: no kvrt call can be captured. Even the direct step, which never waits for the
 * device, is decided on the host each step: its kernels take the store's row count, the
 * unclustered tail and the summary's size as launch arguments (a replayed graph would attend a
 * stale row count), its page table follows a CPU policy, and calls use kvrt's own streams and
 * events (docs/gpu.md, "CUDA graphs"). A call on a stream that is being captured returns
 * KVRT_ERR_FAILED_PRECONDITION before it enqueues anything (the capture stays valid); a decoder
 * that uses graphs captures the layers' other work and calls kvrt between the graphs (since
 * 0.3.2). Since 0.3.32 it may also capture while kvrt works, on another thread or while kvrt's
 * background jobs run, in any capture mode (the global mode, PyTorch's default, included): kvrt
 * makes its CUDA calls in the relaxed capture mode on its threads, so they neither fail nor
 * invalidate the caller's capture; since 0.3.33 a sequence's release and a runtime's destruction
 * too. Tested on the device with cudaStreamBeginCapture and with torch.cuda.graph (global and
 * thread-local modes) on another thread, kvrt on the legacy default stream or a stream of the
 * caller's (docs/gpu.md, "A capture beside kvrt's work"). In torch's global mode torch's own
 * work on another thread can invalidate its capture: a decoder that uses CUDA on several threads
 * captures in the thread-local mode. A kvrt call also discards a CUDA error that the caller's
 * earlier calls on its thread left unread, rather than report it as its own.
 * check_finite does not inspect device tensors. */
typedef enum kvrt_memory { KVRT_MEMORY_HOST = 0, KVRT_MEMORY_DEVICE = 1 } kvrt_memory;

typedef struct kvrt_exec {
  kvrt_memory memory; /* where q, k, v and out live */
  void* cuda_stream;  /* cudaStream_t or NULL (default stream); ignored for host memory */
} kvrt_exec;

KVRT_API kvrt_exec kvrt_exec_default(void);

KVRT_API kvrt_status kvrt_prefill_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                                     const void* q, const void* k, const void* v, int64_t n_tokens,
                                     const kvrt_exec* exec);

/* The prompt rows whose queries a prefill of n_tokens tokens (1 <= n_tokens <= 2^34) reads: the
 * query sample of the index kinds that build from queries (KVRT_INDEX_CLUSTER's query-aware
 * metric, the graph kinds' seeds), rows i * *stride for 0 <= i < *count, evenly spaced over the
 * whole prompt (the last within *stride rows of its end since 0.3.36; every row of a short prompt);
 * *count is 0 for a kind that reads no queries. The stride is an integer, so past the sample's
 * size S = 4096 / (num_q_heads / num_kv_heads) rows *count lies in (S / 2, S]: S + 1 rows give
 * stride 2 and S / 2 + 1 rows. A decoder whose queries are large (a latent attention's:
 * DeepSeek-V2-Lite's 128K-token prompt holds 2.4 GB of queries, of which kvrt reads 256 rows)
 * passes only these rows to kvrt_prefill_sampled_ex. Since 0.3.29. */
KVRT_API kvrt_status kvrt_prefill_query_rows(const kvrt_runtime* rt, int64_t n_tokens,
                                             int64_t* count, int64_t* stride);

/* kvrt_prefill_ex with n_queries of the prompt's queries instead of one per token: q [n_queries,
 * q_heads, head_dim], 0 <= n_queries <= n_tokens (q may be NULL when n_queries is 0), queries of
 * rows spread over the prompt, in prompt order. kvrt takes its query sample from them as
 * kvrt_prefill takes it from n_tokens queries, so the rows kvrt_prefill_query_rows(n_tokens)
 * names, in that order, build the index (and give the results) of kvrt_prefill with every query,
 * without the copy and the check of the others; other rows build another index of the same kind
 * (a chunked prompt's kept queries, say). config.check_finite reads the n_queries rows (host
 * memory). kvrt_prefill_ex(q, k, v, n) is this call with n_queries = n (0 for a NULL q).
 * Since 0.3.29. */
KVRT_API kvrt_status kvrt_prefill_sampled_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer,
                                             const void* q, int64_t n_queries, const void* k,
                                             const void* v, int64_t n_tokens,
                                             const kvrt_exec* exec);
KVRT_API kvrt_status kvrt_append_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* k,
                                    const void* v, int64_t n_tokens, const kvrt_exec* exec);
KVRT_API kvrt_status kvrt_attend_ex(kvrt_runtime* rt, kvrt_seq_id seq, int32_t layer, const void* q,
                                    float* out, const kvrt_exec* exec);
KVRT_API kvrt_status kvrt_attend_batch_ex(kvrt_runtime* rt, const kvrt_seq_id* seqs, int32_t n_seqs,
                                          int32_t layer, const void* q, float* out,
                                          const kvrt_exec* exec);

/* kvrt_attend_batch_ex (n_seqs = 1 for one sequence) that also writes each q head's log-sum-exp:
 * lse f32 [n_seqs, q_heads], in the memory exec names (as out), the natural log of the sum of
 * exp(scale * q . k) over every token the step weighed: the GPU tier, the cold rows attended and,
 * for the cluster kind, the estimate of the clusters left out (streaming heads: the GPU tier
 * only). out is that softmax's output, so a caller merges it exactly with attention it computes
 * itself over other tokens (o = (e^a o_a + e^b o_b) / (e^a + e^b)) or adds terms kvrt does not
 * know, such as a learned attention-sink logit s per head (gpt-oss):
 * o *= 1 / (1 + exp(s - lse)). lse must not be NULL nor overlap out; rows of sequences that
 * fail are left untouched, as out's. Since 0.3.23. */
KVRT_API kvrt_status kvrt_attend_batch_lse_ex(kvrt_runtime* rt, const kvrt_seq_id* seqs,
                                              int32_t n_seqs, int32_t layer, const void* q,
                                              float* out, float* lse, const kvrt_exec* exec);

/* ---- per-head policy ------------------------------------------------------------------------
 * DuoAttention observes that many heads put their weight on the sinks and the recent window
 * ("streaming heads"); serving them from the GPU tier alone skips their cold search and CPU
 * attention. Applies to every sequence. Not concurrent with kvrt_attend (set before decoding);
 * the default is KVRT_HEAD_RETRIEVAL for every head. */
typedef enum kvrt_head_policy { KVRT_HEAD_RETRIEVAL = 0, KVRT_HEAD_STREAMING = 1 } kvrt_head_policy;

KVRT_API kvrt_status kvrt_set_head_policy(kvrt_runtime* rt, int32_t layer, int32_t q_head,
                                          kvrt_head_policy policy);

/* Sets config.search_effort for later searches of every sequence, so that a benchmark can sweep
 * effort over one built index. Not concurrent with kvrt_attend. */
KVRT_API kvrt_status kvrt_set_search_effort(kvrt_runtime* rt, int32_t effort);

/* ---- statistics ------------------------------------------------------------------------------ */

typedef struct kvrt_stats {
  size_t struct_size; /* set by the caller to sizeof(kvrt_stats) (kvrt_stats_init()); the
                         library writes that many bytes. Since 0.3. */
  /* Token counts are per layer, summed over layers and sequences; "so far" counters run from
   * kvrt_runtime_create and count successful calls only. */
  int64_t sequences;    /* live sequences */
  int64_t gpu_tokens;   /* tokens (per layer, summed over layers and sequences) in the GPU tier */
  int64_t host_tokens;  /* tokens in the host store, same counting */
  int64_t gpu_bytes;    /* bytes of K and V in the GPU tier */
  int64_t host_bytes;   /* bytes of K and V in the host store */
  int64_t index_bytes;  /* bytes the cold indexes hold beyond the host store */
  int64_t attend_calls; /* successful layer attends so far (kvrt_attend, and each
                           sequence a kvrt_attend_batch attended) */
  int64_t keys_scored;  /* cold keys scored by index searches (scanned) so far, in key-sized dot
                           products: an IVF or cluster search's centroids and a landmark search's
                           bounds count too, so a search that ends up reading every cold key
                           scores more than there are */
  int64_t cold_keys_searchable; /* sum over the retrieval q heads of each attend of the cold keys
                                   they could search (streaming heads, which search nothing, are
                                   not counted since 0.3), so keys_scored / cold_keys_searchable
                                   is the fraction scanned */
  int64_t cold_tokens_attended; /* cold tokens attended to so far (over q heads) */
  int64_t evicted_tokens;       /* tokens moved GPU tier -> host store so far (per layer); prompt
                                   tokens that a prefill or append sends straight to the host store
                                   (never on the GPU tier) are not counted */
  int64_t gpu_allocated_bytes;  /* GPU-tier buffers allocated (what gpu_memory_limit counts; host
                                   backend: the sink and window buffers in host memory), and the
                                   cluster summaries' device copies (summary_gpu_bytes) */
  /* Decode-path time in ns, summed over attends. The host backend fills the wall, search and
   * CPU-attention times, and since 0.3.37 its tier attention and merge as the CPU's wall time
   * (h2d stays 0 there). Device times come from CUDA events and
   * are added once the work completed (for device output: at the layer's next attend; since 0.3.7
   * one attend in 8 is timed there and counts 8-fold, an estimate). */
  int64_t time_attend_ns;        /* wall time inside attend calls */
  int64_t time_gpu_attention_ns; /* partial attention over sinks + window (device time; host
                                    backend: wall time) */
  int64_t time_d2h_ns;           /* CPU waiting for q D2H and storing evicted rows (a wait for
                                    an index build is time_background_wait_ns's alone, since
                                    0.3.37) */
  int64_t time_cpu_search_ns;    /* cold-index search (wall share of the CPU phase; in a batch
                                    each member's, summed: members run in parallel, so a batch's
                                    parts may add up to more than its time_attend_ns) */
  int64_t time_cpu_attention_ns; /* CPU attention over retrieved rows (wall share, as above) */
  int64_t time_h2d_ns;           /* H2D of the CPU partial state (device time) */
  int64_t time_merge_ns;         /* merge of the partial states (device time; host backend:
                                    wall time) */
  int64_t time_idle_ns;          /* CPU waiting for the GPU at the end (host output) */
  int64_t eviction_batches;      /* D2H batches of evicted tokens */
  int64_t index_update_failures; /* cold-index builds/inserts that failed (e.g. out of memory);
                                    the tokens were stored, the rows the index misses are scanned
                                    exactly and the update is retried: speed, not correctness */
  int64_t keys_read;             /* cold keys read by searches: keys_scored, except that a group
                                    search (config.group_search, and the cluster kind's group
                                    selection, cluster_group_select, its default) reads a key once
                                    for all the q heads that score it. Since 0.2. */
  int64_t attends_fetch;         /* layer attends whose cold tier ran in fetch mode (GPU backend).
                                    Since 0.2. */
  int64_t attends_gpu_select;    /* layer attends whose cold selection was scored on the GPU from a
                                    device copy of a two-level kind's summary (KVRT_INDEX_CLUSTER,
                                    GPU backend). Since 0.3. */
  int64_t summary_gpu_bytes;     /* bytes of those summaries in device memory now (also counted in
                                    gpu_allocated_bytes, under gpu_memory_limit). Since 0.3. */
  /* The GPU hot cache (config.hot_cache_fraction). Since 0.3.1. */
  int64_t hot_hits;            /* row groups (clusters, outlier runs, chunks of unclustered rows)
                                  a step attended from the cache, so far */
  int64_t hot_misses;          /* row groups copied into it (host -> GPU), so far */
  int64_t hot_h2d_bytes;       /* bytes of K and V those copies moved, so far */
  int64_t hot_cache_gpu_bytes; /* bytes of the caches in device memory now (also counted in
                                  gpu_allocated_bytes) */
  int64_t time_hot_cache_ns;   /* CPU wall time preparing the cache's part of attends (lookups,
                                  gathering the rows it misses from the host store), so far; part
                                  of time_cpu_search_ns */
  /* The GPU build of KVRT_INDEX_CLUSTER at prefill. Since 0.3.2. */
  int64_t segments_built_gpu;    /* (kv head, token segment) pairs clustered on the GPU, so far
                                    (the others are clustered on the CPU) */
  int64_t time_segment_build_ns; /* wall time of those builds (GPU k-means and the layout of its
                                    result; the copy to the host store and the index after it
                                    are not included), so far */
  /* The direct step (config.cluster_direct_step). Since 0.3.3. hot_hits / hot_misses then count
   * 8-row blocks of the store (used from the cache / given a page), and a direct step's
   * cold_tokens_attended is counted at that layer's next attend (without record_attended): the
   * step itself never waits to know it. Since 0.3.6 a page fills from the rows the steps read
   * over PCIe (direct_host_bytes), kept on the device for it, so hot_h2d_bytes stays 0 there. */
  int64_t attends_direct;    /* layer attends that ran the direct step, so far (fewer than
                                attends_gpu_select: some layer fell back, its store could not be
                                registered or its cache found no room) */
  int64_t direct_host_bytes; /* bytes of K and V the direct step read straight from the host store
                                over PCIe (rows not in the cache), so far; counted one step late */
  int64_t time_background_wait_ns; /* wall time calls spent waiting for a layer's background work
                                      to finish, so far: after a prefill from device pointers, the
                                      copy of the prompt's cold rows to the host store and their
                                      index build run behind the caller's next work, and the
                                      layer's next call (the first decode step's append or
                                      attend) waits for them here; also waits for an index
                                      refresh. Since 0.3.4. */
  int64_t value_codes_fallbacks;   /* GPU backend, cluster_value_bits on the device: summary uploads
                                      (a layer's, at each index change) whose value codes the
                                      device could not take (a segment's value grid past f16's
                                      range, values of ~6e4 and more), so that the steps until the
                                      next upload estimated the rest from the value means, so far.
                                      Since 0.3.19. */
  int64_t evicted_in_place;        /* of evicted_tokens, those a decode append's kernel wrote
                                      straight into the host store, where the direct step reads them
                                      (its stores registered that far), instead of into a pinned
                                      block that the host copies; so far (on by default since
                                      0.3.36; 0 with KVRT_IN_PLACE_EVICT=0, docs/gpu.md). Since
                                      0.3.34. */
} kvrt_stats;

/* Writes the first out->struct_size bytes of the statistics (KVRT_ERR_INVALID_ARGUMENT, nothing
 * written, for a size that no kvrt.h since 0.3 declared). */
KVRT_API kvrt_status kvrt_get_stats(const kvrt_runtime* rt, kvrt_stats* out);

/* A zeroed kvrt_stats with struct_size set, ready for kvrt_get_stats. */
static inline kvrt_stats kvrt_stats_init(void) {
#ifdef __cplusplus
  kvrt_stats s{};
#else
  kvrt_stats s = {0};
#endif
  s.struct_size = sizeof s;
  return s;
}

#ifdef __cplusplus
}
#endif

#endif /* KVRT_H_ */
