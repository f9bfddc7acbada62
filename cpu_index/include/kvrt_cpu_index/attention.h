#pragma once
// Host partial attention (docs/architecture.md, Numerics). A partial state over a token set S is
// the normalised output o = sum exp(s_i - lse) v_i and lse = log sum exp(s_i), s_i = scale * q.k_i.
// The empty set gives o = 0, lse = -inf.
#include <cstdint>

#include "kvrt_common/dtype.h"

namespace kvrt::cpu_index {

class HeadStore;

// Rows [0, n) of dense arrays: keys/values rows `stride_elems` apart, in dtype t.
// q: f32 [d]; o: f32 [d].
void AttendDense(const float* q, int d, float scale, const void* keys, const void* values,
                 std::size_t stride_elems, DType t, int64_t n, float* o, float* lse,
                 bool tiles = false);

// The same rows for nq queries (the q heads of one kv head over its interleaved rows): q [nq, d],
// o [nq, d], lse [nq]. Each head's result is AttendDense's, bit for bit; the rows are read once
// for all the heads instead of once per head.
void AttendDenseGroup(const float* q, int nq, int d, float scale, const void* keys,
                      const void* values, std::size_t stride_elems, DType t, int64_t n, float* o,
                      float* lse, bool tiles = false);

// Rows given by pointers: keys[j], values[j] each d elements of dtype t (a gathered list).
void AttendRowPointers(const float* q, int d, float scale, DType t, int64_t n,
                       const void* const* keys, const void* const* values, float* o, float* lse,
                       bool tiles = false);

// The listed rows of a HeadStore (ids need not be sorted; duplicates are the caller's bug).
void AttendStoreRows(const float* q, float scale, const HeadStore& store, const int64_t* ids,
                     int64_t n, float* o, float* lse, bool tiles = false);

// The same rows for nq queries (the q heads of one kv head that selected them): q [nq, d], o
// [nq, d], lse [nq]. Each head's result is AttendStoreRows's, bit for bit; the rows' keys and
// values are read once for all the heads instead of once per head.
void AttendStoreRowsGroup(const float* q, int nq, float scale, const HeadStore& store,
                          const int64_t* ids, int64_t n, float* o, float* lse, bool tiles = false);

// tiles (every function above): the products on the CPU's AMX tiles where they run (bf16 rows;
// docs/architecture.md, "The host attention on the tiles"): the queries and the softmax weights
// split into three bf16 terms, so the products are exact and only the order of the f32 sums
// differs from the AVX-512 loops' (and the weights' exp, vectorised there: within 2^-22 of
// libm's, exp_sum.h). Either way a head's result does not depend on the heads that
// share its pass; a caller compares results only of calls that made the same choice (the runtime
// makes it once, UseHostTiles).
//
// Whether a runtime of this many q heads per kv head takes the tiles: where they run, for groups
// of 8 or more (an MQA model's, MLA's latent), and KVRT_HOST_TILES is not 0. Narrower groups keep
// the loops: each product is padded to 16 heads, and at 4 heads of 128 dims the tiles were slower
// (docs/benchmarks.md, forty-second session).
bool UseHostTiles(int q_heads_per_kv_head);

// Heads a caller's group pass should take at once: 16 on the tiles (the width a product is padded
// to), else 4 (the AVX-512 loops' width).
int GroupPassHeads(bool tiles);

// Every row of a HeadStore.
void AttendStoreAll(const float* q, float scale, const HeadStore& store, float* o, float* lse,
                    bool tiles = false);

// Merges (o2, lse2) into (o1, lse1), in place. Two empty states stay empty (no NaN).
void MergeInto(float* o1, float* lse1, const float* o2, float lse2, int d);

// Merges n partial states of one row: o[i] f32 [d] with lse[i]. lse_out = log sum exp(lse[i]);
// o_out = sum exp(lse[i] - lse_out) o[i] (o_out may alias any o[i]). An empty state (lse -inf)
// has weight 0 and its o is not read; all empty gives (0, -inf). The decode step's merge on the
// host and the reference of the device merge (kvrt_gpu MergeStatesN).
void MergeStates(int n, const float* const* o, const float* lse, int d, float* o_out,
                 float* lse_out);

}  // namespace kvrt::cpu_index
