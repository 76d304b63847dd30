#include "philox.h"

namespace ant {

namespace {

constexpr uint32_t kMulA = 0xD2511F53u;  // round multipliers
constexpr uint32_t kMulB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;  // key increments (Weyl sequence)
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr float kTwoM24 = 1.0f / 16777216.0f;

inline void Rounds(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kMulA) * c[0];
    const uint64_t p2 = static_cast<uint64_t>(kMulB) * c[2];
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c[1] ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k1;
    c[1] = static_cast<uint32_t>(p2);
    c[3] = static_cast<uint32_t>(p0);
    c[0] = n0;
    c[2] = n2;
    k0 += kKeyA;
    k1 += kKeyB;
  }
}

}  // namespace

void Philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]) {
  uint32_t c[4] = {ctr[0], ctr[1], ctr[2], ctr[3]};
  Rounds(c, key[0], key[1]);
  for (int j = 0; j < 4; ++j) out[j] = c[j];
}

void PhiloxUniform(uint64_t seed, uint64_t step, int64_t count, float* out) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
  const int64_t blocks = (count + 3) / 4;
  for (int64_t b = 0; b < blocks; ++b) {
    const uint64_t ub = static_cast<uint64_t>(b);
    uint32_t c[4] = {static_cast<uint32_t>(ub), static_cast<uint32_t>(ub >> 32), s0, s1};
    Rounds(c, k0, k1);
    const int64_t n = 4 * b, m = count - n < 4 ? count - n : 4;
    for (int64_t j = 0; j < m; ++j) out[n + j] = static_cast<float>(c[j] >> 8) * kTwoM24;
  }
}

}  // namespace ant
