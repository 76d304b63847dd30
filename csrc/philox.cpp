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

void PhiloxBlock(uint64_t seed, uint64_t step, uint64_t b, uint32_t out[4]) {
  const uint32_t c[4] = {static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32),
                         static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)};
  const uint32_t key[2] = {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)};
  Philox4x32(c, key, out);
}

float PhiloxValue(const uint32_t words[4], int64_t m) {
  return static_cast<float>(words[m & 3] >> 8) * kTwoM24;
}

void PhiloxUniform(uint64_t seed, uint64_t step, int64_t offset, int64_t count, float* out) {
  uint32_t w[4];
  int64_t j = 0;
  for (; j < count && ((offset + j) & 3) != 0; ++j) {  // up to the first whole block
    PhiloxBlock(seed, step, static_cast<uint64_t>(offset + j) >> 2, w);
    out[j] = PhiloxValue(w, offset + j);
  }
  for (; j + 4 <= count; j += 4) {  // whole blocks: 4 values per Philox call
    PhiloxBlock(seed, step, static_cast<uint64_t>(offset + j) >> 2, w);
    for (int64_t i = 0; i < 4; ++i) out[j + i] = static_cast<float>(w[i] >> 8) * kTwoM24;
  }
  if (j < count) PhiloxBlock(seed, step, static_cast<uint64_t>(offset + j) >> 2, w);
  for (int64_t i = 0; j + i < count; ++i) out[j + i] = static_cast<float>(w[i] >> 8) * kTwoM24;
}

}  // namespace ant
