// Constrained interval clustering of T timesteps into k contiguous clusters, solved exactly.
//
// Contract
//   Split 0..T-1 into k half-open intervals [b_0 = 0, b_1), ..., [b_{k-1}, b_k = T) minimising
//   sum_m cost([b_m, b_{m+1})), optionally with min_size <= b_{m+1} - b_m <= max_size.
//   Costs (c = l + (r - l - 1) / 2, the middle index of [l, r)):
//     kL1       values v [T], monotone:  sum_{t in [l, r)} |v_t - v_c|   (v_c is a median)
//     kL2       values v [T], any order: sum_{t in [l, r)} (v_t - mean)^2 (1-D k-means)
//     kAffinity matrix A [T, T]:        -sum_{t in [l, r)} A[c, t]
//     kMatrix   matrix C [T, T]:         C[l, r - 1] (inclusive indices, upper triangle only)
//   Every cost is O(1) per interval after prefix sums.
//
// Ties: D[m][i] = min_j D[m-1][j] + cost([j, i)) keeps the smallest minimising j (candidates
//   scanned in increasing j with an exact `<`; the affinity layer, which visits them centre by
//   centre for cache locality, compares j explicitly on equal values). Backtracking from (k, T)
//   therefore returns the optimum whose split points, read from the last one backwards, are
//   lexicographically smallest. The numpy twin (antdiff._dp_numpy) computes bit-identical
//   costs (same operations in the same order) and applies the same rule.
//
// Complexity
//   kQuadratic:     O(k * T * W) time, W = the number of feasible j per i (<= T; the size
//                   window shrinks it to max_size - min_size + 1), O(k * T) memory.
//   kDivideConquer: O(k * T log T) time. Valid only for costs with the quadrangle inequality
//                   (kL1, kL2 on monotone values); size limits preserve it. Leftmost minima of
//                   such (Monge) problems are monotone in i, so it returns the same split
//                   when the costs are exact; on rounded ties, an optimum equal up to rounding.
//   kAffinity builds T x (T + 1) row prefix sums (8 (T^2 + T) bytes); kMatrix reads C in place.
//
// Errors: std::invalid_argument whose message names the argument, the value and what is valid.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace ant {

enum class CostKind { kL1, kL2, kAffinity, kMatrix };
enum class Algorithm { kAuto, kQuadratic, kDivideConquer };

// algorithm = kAuto picks kDivideConquer when it is valid and T > kAutoDcMinT.
inline constexpr int64_t kAutoDcMinT = 4096;

// "l1" | "l2" | "affinity" | "matrix"; throws std::invalid_argument naming `cost` otherwise.
CostKind ParseCostKind(const std::string& name);
// "auto" | "quadratic" | "dc"; throws std::invalid_argument naming `algorithm` otherwise.
Algorithm ParseAlgorithm(const std::string& name);

// A borrowed, row-major float64 buffer: shape {T} for kL1/kL2, {T, T} for kAffinity/kMatrix.
struct CostInput {
  CostKind kind;
  const double* data;
  std::vector<int64_t> shape;
};

struct IntervalSplit {
  std::vector<int64_t> bounds;  // [k + 1], bounds[0] = 0 < ... < bounds[k] = T
  double cost;                  // the optimal total
};

// Validates everything, then solves. std::nullopt = no size limit. Thread-safe; `input.data`
// must stay alive and unchanged during the call.
IntervalSplit SolveIntervals(const CostInput& input, int64_t k, std::optional<int64_t> min_size,
                             std::optional<int64_t> max_size, Algorithm algorithm);

}  // namespace ant
