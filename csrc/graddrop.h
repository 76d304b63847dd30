// GradDrop's update of k per-cluster gradients on the CPU, column by column, with U from the
// counter-based stream of csrc/philox.h: the arithmetic of ant_kernels.reference.graddrop_ref
// in float32, in the same order, so the two agree bit for bit.
#pragma once

#include <cstdint>

namespace ant {

// For column p of J (k rows, row r at J + r * row_stride, columns contiguous), with
// g_i = keep[i] != 0 ? J[i][p] : 0: purity = 0.5 (1 + sum g / sum |g|) (0.5 where all are 0),
// u = value p of the stream (seed, step), kept_i = (purity > u && g_i > 0) ||
// (purity < u && g_i < 0), out[p] = (sum_i (kept_i ? g_i : leak * g_i)) / divisor.
// out may be row 0 of J (each tile of columns is read before it is written). O(k P).
void GradDrop(const float* J, int64_t k, int64_t P, int64_t row_stride, const float* keep,
              uint64_t seed, uint64_t step, float leak, float divisor, float* out);

}  // namespace ant
