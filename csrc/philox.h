// Counter-based uniform random numbers (Philox4x32-10, Salmon et al., SC 2011): value n of the
// stream (seed, step) depends on (seed, step, n) only, so a stream can be indexed by a counter
// that lives on the device and resumed exactly from (seed, step) alone.
#pragma once

#include <cstdint>

namespace ant {

// Philox4x32 with 10 rounds on counter ctr[4] under key key[2]; writes the 4 output words.
void Philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

// Value m of the stream (seed, step): (word >> 8) * 2^-24 in [0, 1), word m % 4 of Philox4x32-10
// on counter (m / 4 low, m / 4 high, step low, step high) under key (seed low, seed high).
float PhiloxValue(const uint32_t words[4], int64_t m);

// out[j] = value offset + j of the stream (seed, step) for j in [0, count). O(count).
void PhiloxUniform(uint64_t seed, uint64_t step, int64_t offset, int64_t count, float* out);

// Philox4x32-10 words of counter block b of the stream (seed, step).
void PhiloxBlock(uint64_t seed, uint64_t step, uint64_t b, uint32_t out[4]);

}  // namespace ant
