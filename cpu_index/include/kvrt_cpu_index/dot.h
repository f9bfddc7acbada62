#pragma once
// Dot products of an f32 query with stored rows (f32/f16/bf16), f32 accumulation. The hot loop
// of every scan; compiled for several ISAs and dispatched at run time (CI's CPU may lack
// AVX-512, the GPU machine's has it).
#include <cstddef>
#include <cstdint>

#include "kvrt_common/dtype.h"

namespace kvrt::cpu_index {

float DotRow(const float* q, const void* row, int d, DType t);

// out[j] = qs[j] . row for nq queries qs [nq, d]: one key scored by every query of a GQA group
// while it is in cache; each score equals DotRow's bit for bit.
void DotRowMulti(const float* qs, int nq, const void* row, int d, DType t, float* out);

// out[i] = q . rows[i], rows `stride_elems` apart.
void DotRows(const float* q, const void* rows, int d, DType t, int64_t n, std::size_t stride_elems,
             float* out);

// y[h * d + i] += w[h * w_stride] * x[i] for h < nq, i < d: one value row's weighted share added
// to nq heads' sums (the attention's value pass). Multiversioned like the dots; a multiply and an
// add, never fused, as in every function here.
void AddScaledRow(const float* w, std::size_t w_stride, int nq, const float* x, float* y, int d);

// y[h * d + i] += sum over j < n, in order, of w[h * w_stride + j] * rows[j][i], for h < nh, i < d
// (rows [n, d] of type t, contiguous): a run of rows' weighted shares added to nh heads' sums, as
// AddScaledRow row by row would add them, the same for a head whatever nh is (a weight of 0 adds
// a zero).
void AddWeightedRows(const float* w, std::size_t w_stride, int nh, const void* rows, DType t,
                     int64_t n, int d, float* y);
// AddWeightedRows over rows given by pointer (rows[j]: d values of type t).
void AddWeightedRowPointers(const float* w, std::size_t w_stride, int nh, const void* const* rows,
                            DType t, int64_t n, int d, float* y);

}  // namespace kvrt::cpu_index
