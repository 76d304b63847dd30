// Per-step host operations of a CPU training step, each one call instead of a chain of small
// torch operators (a training step leaves a small CPU's caches cold, and every operator then
// costs 20-50 us on a 2-core machine, whatever its size).
#pragma once

#include <cstdint>

namespace ant {

// Uncertainty weighting's reduction of B per-sample losses to the total (see antdiff.mtl.UW):
// L_i = inv_i * sum_{n: cid_n = i} per_n, c_i = present_i * exp(-s_i) / (2k),
// total = sum_i c_i L_i + s_i present_i / 2; and what the backward needs:
// coef_i = c_i inv_i (d total / d per_n = coef[cid_n]), ds_i = present_i / 2 - c_i L_i.
// present_i is 1 or 0 (IEEE products: a non-finite s_i or exp(-s_i) gives NaN even where it is
// 0). Sums in double. Throws std::invalid_argument for a cid_n outside [0, k).
void UwForward(const float* per, const int64_t* cid, int64_t B, const float* inv,
               const float* present, const float* s, int64_t k, float* total, float* L, float* c,
               float* coef, float* ds);

// d_per_n = g * coef[cid_n], coef [k]; throws std::invalid_argument for a cid outside [0, k).
void UwBackward(const float* g, const float* coef, int64_t k, const int64_t* cid, int64_t B,
                float* d_per);

}  // namespace ant
