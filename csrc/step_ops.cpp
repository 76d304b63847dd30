#include "step_ops.h"

#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace ant {

void UwForward(const float* per, const int64_t* cid, int64_t B, const float* inv,
               const float* present, const float* s, int64_t k, float* total, float* L, float* c,
               float* coef, float* ds) {
  std::vector<double> sums(static_cast<size_t>(k), 0.0);
  for (int64_t n = 0; n < B; ++n) {
    const int64_t i = cid[n];
    if (i < 0 || i >= k) {
      throw std::invalid_argument("UwForward: cluster id " + std::to_string(i) +
                                  " outside [0, " + std::to_string(k) + ")");
    }
    sums[static_cast<size_t>(i)] += per[n];
  }
  double t = 0.0;
  const float log_scale = static_cast<float>(std::log(0.5 / static_cast<double>(k)));
  for (int64_t i = 0; i < k; ++i) {
    const float li = static_cast<float>(sums[static_cast<size_t>(i)] * inv[i]);
    // present * exp(-s) / 2k, as the torch path computes it: a non-finite exponential gives
    // NaN even for an absent cluster
    const float ci = present[i] * std::exp(log_scale - s[i]);
    L[i] = li;
    c[i] = ci;
    coef[i] = ci * inv[i];
    ds[i] = 0.5f * present[i] - ci * li;
    t += static_cast<double>(ci) * li + 0.5 * static_cast<double>(s[i]) * present[i];
  }
  *total = static_cast<float>(t);
}

void UwBackward(const float* g, const float* coef, int64_t k, const int64_t* cid, int64_t B,
                float* d_per) {
  const float gv = *g;
  for (int64_t n = 0; n < B; ++n) {
    const int64_t i = cid[n];
    if (i < 0 || i >= k) {  // coef has k entries: never read past them
      throw std::invalid_argument("UwBackward: cluster id " + std::to_string(i) +
                                  " outside [0, " + std::to_string(k) + ")");
    }
    d_per[n] = gv * coef[i];
  }
}

}  // namespace ant
