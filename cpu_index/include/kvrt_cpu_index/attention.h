#pragma once
// Host partial attention (DESIGN.md, Numerics). A partial state over a token set S is the
// normalised output o = sum exp(s_i - lse) v_i and lse = log sum exp(s_i), s_i = scale * q.k_i.
// The empty set gives o = 0, lse = -inf.
#include <cstdint>

#include "kvrt_common/dtype.h"

namespace kvrt::cpu_index {

class HeadStore;

// Rows [0, n) of dense arrays: keys/values rows `stride_elems` apart, in dtype t.
// q: f32 [d]; o: f32 [d].
void AttendDense(const float* q, int d, float scale, const void* keys, const void* values,
                 std::size_t stride_elems, DType t, int64_t n, float* o, float* lse);

// The listed rows of a HeadStore (ids need not be sorted; duplicates are the caller's bug).
void AttendStoreRows(const float* q, float scale, const HeadStore& store, const int64_t* ids,
                     int64_t n, float* o, float* lse);

// Every row of a HeadStore.
void AttendStoreAll(const float* q, float scale, const HeadStore& store, float* o, float* lse);

// Merges (o2, lse2) into (o1, lse1), in place. Two empty states stay empty (no NaN).
void MergeInto(float* o1, float* lse1, const float* o2, float lse2, int d);

}  // namespace kvrt::cpu_index
