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
                 std::size_t stride_elems, DType t, int64_t n, float* o, float* lse);

// The same rows for nq queries (the q heads of one kv head over its interleaved rows): q [nq, d],
// o [nq, d], lse [nq]. Each head's result is AttendDense's, bit for bit; the rows are read once
// for all the heads instead of once per head.
void AttendDenseGroup(const float* q, int nq, int d, float scale, const void* keys,
                      const void* values, std::size_t stride_elems, DType t, int64_t n, float* o,
                      float* lse);

// Rows given by pointers: keys[j], values[j] each d elements of dtype t (a gathered list).
void AttendRowPointers(const float* q, int d, float scale, DType t, int64_t n,
                       const void* const* keys, const void* const* values, float* o, float* lse);

// The listed rows of a HeadStore (ids need not be sorted; duplicates are the caller's bug).
void AttendStoreRows(const float* q, float scale, const HeadStore& store, const int64_t* ids,
                     int64_t n, float* o, float* lse);

// The same rows for nq queries (the q heads of one kv head that selected them): q [nq, d], o
// [nq, d], lse [nq]. Each head's result is AttendStoreRows's, bit for bit; the rows' keys and
// values are read once for all the heads instead of once per head.
void AttendStoreRowsGroup(const float* q, int nq, float scale, const HeadStore& store,
                          const int64_t* ids, int64_t n, float* o, float* lse);

// Heads a group pass (AttendDenseGroup, AttendStoreRowsGroup) should take at once: 16 where a bf16
// pass runs on the CPU's AMX tiles (each pass a product padded to 16 heads, docs/architecture.md),
// else 4 (the AVX-512 loops' width). A caller that splits a wide group into passes takes this many
// heads per pass; a head's result is the same whatever its pass holds.
int GroupPassHeads();

// Every row of a HeadStore.
void AttendStoreAll(const float* q, float scale, const HeadStore& store, float* o, float* lse);

// Merges (o2, lse2) into (o1, lse1), in place. Two empty states stay empty (no NaN).
void MergeInto(float* o1, float* lse1, const float* o2, float lse2, int d);

// Merges n partial states of one row: o[i] f32 [d] with lse[i]. lse_out = log sum exp(lse[i]);
// o_out = sum exp(lse[i] - lse_out) o[i] (o_out may alias any o[i]). An empty state (lse -inf)
// has weight 0 and its o is not read; all empty gives (0, -inf). The decode step's merge on the
// host and the reference of the device merge (kvrt_gpu MergeStatesN).
void MergeStates(int n, const float* const* o, const float* lse, int d, float* o_out,
                 float* lse_out);

}  // namespace kvrt::cpu_index
