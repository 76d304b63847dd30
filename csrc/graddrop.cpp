#include "graddrop.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "philox.h"

namespace ant {

namespace {

constexpr int64_t kTile = 512;  // columns per pass: the tile's U and sums stay in L1

// kept ? g : d without a branch (a data-dependent branch mispredicts half the time)
inline float Select(bool kept, float g, float d) {
  uint32_t gi, di;
  std::memcpy(&gi, &g, 4);
  std::memcpy(&di, &d, 4);
  const uint32_t m = 0u - static_cast<uint32_t>(kept);
  const uint32_t r = (gi & m) | (di & ~m);
  float v;
  std::memcpy(&v, &r, 4);
  return v;
}

}  // namespace

void GradDrop(const float* J, int64_t k, int64_t P, int64_t row_stride, const float* keep,
              uint64_t seed, uint64_t step, float leak, float divisor, float* out) {
  float u[kTile], total[kTile], mass[kTile], res[kTile];
  for (int64_t p0 = 0; p0 < P; p0 += kTile) {
    const int64_t n = std::min(kTile, P - p0);
    PhiloxUniform(seed, step, p0, n, u);
    std::fill(total, total + n, 0.0f);
    std::fill(mass, mass + n, 0.0f);
    std::fill(res, res + n, 0.0f);
    // rows in order, columns innermost (vectorised); an absent row adds nothing
    for (int64_t i = 0; i < k; ++i) {
      if (keep[i] == 0.0f) continue;
      const float* row = J + i * row_stride + p0;
      for (int64_t j = 0; j < n; ++j) {
        total[j] += row[j];
        mass[j] += std::fabs(row[j]);
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      const float purity = 0.5f * (1.0f + total[j] / (mass[j] > 0.0f ? mass[j] : 1.0f));
      total[j] = purity;  // reused: the purity of column j
    }
    for (int64_t i = 0; i < k; ++i) {
      if (keep[i] == 0.0f) continue;
      const float* row = J + i * row_stride + p0;
      for (int64_t j = 0; j < n; ++j) {
        const float g = row[j];
        const bool kept = ((total[j] > u[j]) & (g > 0.0f)) | ((total[j] < u[j]) & (g < 0.0f));
        res[j] += Select(kept, g, leak * g);
      }
    }
    for (int64_t j = 0; j < n; ++j) out[p0 + j] = res[j] / divisor;  // after every read of J
  }
}

}  // namespace ant
