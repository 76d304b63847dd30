// Interval-clustering DP: validation, the four costs, the quadratic and divide-and-conquer
// layer solvers and the backtrack. See interval_dp.h for the contract.
#include "interval_dp.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iomanip>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <type_traits>

namespace ant {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

[[noreturn]] void Fail(const std::string& message) { throw std::invalid_argument(message); }

std::string ShapeString(const std::vector<int64_t>& shape) {
  std::ostringstream s;
  s << "(";
  for (size_t d = 0; d < shape.size(); ++d) s << (d ? ", " : "") << shape[d];
  s << (shape.size() == 1 ? ",)" : ")");
  return s.str();
}

// +1 if v is non-decreasing, -1 if non-increasing but not constant, 0 otherwise.
// first_up / first_down: the smallest t with v[t + 1] > v[t] / v[t + 1] < v[t], or -1.
int MonotoneDirection(const double* v, int64_t T, int64_t* first_up, int64_t* first_down) {
  *first_up = -1;
  *first_down = -1;
  for (int64_t t = 0; t + 1 < T; ++t) {
    if (*first_up < 0 && v[t + 1] > v[t]) *first_up = t;
    if (*first_down < 0 && v[t + 1] < v[t]) *first_down = t;
  }
  if (*first_down < 0) return 1;
  return *first_up < 0 ? -1 : 0;
}

// Branch-free scan (vectorises with plain SSE2): the exponent field is all ones exactly for
// NaN and inf, and then adding 1 to it carries into bit 11.
bool AllFinite(const double* x, int64_t n) {
  uint64_t carry = 0;
  for (int64_t t = 0; t < n; ++t) {
    uint64_t bits;
    std::memcpy(&bits, x + t, sizeof bits);
    carry |= ((bits >> 52) & 0x7ffu) + 1u;
  }
  return (carry & 0x800u) == 0;
}

void CheckFinite(const CostInput& in, int64_t T) {
  if (in.kind == CostKind::kL1 || in.kind == CostKind::kL2) {
    if (AllFinite(in.data, T)) return;
    for (int64_t t = 0; t < T; ++t) {
      if (!std::isfinite(in.data[t])) {
        Fail("values contains NaN or inf at index " + std::to_string(t) +
             "; every entry must be finite");
      }
    }
    return;
  }
  // cost='matrix' reads only the upper triangle, so only that part has to be finite.
  const bool upper_only = in.kind == CostKind::kMatrix;
  for (int64_t r = 0; r < T; ++r) {
    const int64_t c0 = upper_only ? r : 0;
    if (AllFinite(in.data + r * T + c0, T - c0)) continue;
    for (int64_t c = c0; c < T; ++c) {
      if (!std::isfinite(in.data[r * T + c])) {
        Fail("matrix contains NaN or inf at [" + std::to_string(r) + ", " + std::to_string(c) +
             "]; every entry must be finite");
      }
    }
  }
}

// Refuses data whose interval costs or prefix sums could overflow float64 anywhere in the DP: an
// overflowed candidate would be skipped (and the split silently not optimal) or leave no split.
// The bound is on the largest intermediate: n * sum(x^2) (l2), prefix sums (l1), the affinity's
// 2-D prefix sums, k summed matrix entries. Only the entries the cost reads count.
void CheckMagnitude(const CostInput& in, int64_t T, int64_t k) {
  double top = 0.0;
  if (in.kind == CostKind::kL1 || in.kind == CostKind::kL2) {
    for (int64_t t = 0; t < T; ++t) top = std::max(top, std::fabs(in.data[t]));
  } else {  // cost='matrix' reads only the upper triangle
    for (int64_t r = 0; r < T; ++r) {
      for (int64_t c = in.kind == CostKind::kMatrix ? r : 0; c < T; ++c) {
        top = std::max(top, std::fabs(in.data[r * T + c]));
      }
    }
  }
  const double t = static_cast<double>(T);
  double bound = 0.0;
  switch (in.kind) {
    case CostKind::kL2: bound = t * t * top * top; break;
    case CostKind::kL1: bound = 4.0 * t * top; break;
    case CostKind::kAffinity: bound = 2.0 * t * t * top; break;
    case CostKind::kMatrix: bound = 2.0 * static_cast<double>(k) * top; break;
  }
  if (!(bound < 1e300)) {
    const char* names[] = {"l1", "l2", "affinity", "matrix"};
    std::ostringstream msg;
    msg << "interval DP (" << names[static_cast<int>(in.kind)]
        << "): the costs overflow float64 (the largest |value| is " << std::setprecision(3) << top
        << "); rescale the input";
    Fail(msg.str());
  }
}

// Returns T; sets *direction (see MonotoneDirection) for the 1-D costs.
int64_t ValidateInput(const CostInput& in, int* direction) {
  const bool one_d = in.kind == CostKind::kL1 || in.kind == CostKind::kL2;
  if (one_d && (in.shape.size() != 1 || in.shape[0] < 1)) {
    Fail("values must be a 1-D array [T] with T >= 1; got shape " + ShapeString(in.shape));
  }
  if (!one_d && (in.shape.size() != 2 || in.shape[0] != in.shape[1] || in.shape[0] < 1)) {
    Fail("matrix must be a square 2-D array [T, T] with T >= 1; got shape " +
         ShapeString(in.shape));
  }
  const int64_t T = in.shape[0];
  CheckFinite(in, T);
  *direction = 0;
  if (one_d) {
    int64_t up = -1, down = -1;
    *direction = MonotoneDirection(in.data, T, &up, &down);
    if (in.kind == CostKind::kL1 && *direction == 0) {
      Fail("values must be monotone (non-decreasing or non-increasing) for cost='l1': values[" +
           std::to_string(up + 1) + "] > values[" + std::to_string(up) + "] but values[" +
           std::to_string(down + 1) + "] < values[" + std::to_string(down) +
           "]; sort them or use cost='l2'");
    }
  }
  return T;
}

struct Window {
  int64_t min_size;  // resolved: 1 <= min_size <= max_size <= T
  int64_t max_size;
};

Window ValidateSizes(int64_t T, int64_t k, std::optional<int64_t> min_size,
                     std::optional<int64_t> max_size) {
  const std::string ks = std::to_string(k), ts = std::to_string(T);
  if (k < 1) Fail("k must be >= 1; got " + ks);
  if (k > T) Fail("k must be <= T = " + ts + " (at least one timestep per cluster); got " + ks);
  const auto check_positive = [](const char* name, std::optional<int64_t> size) {
    if (size && *size < 1) {
      Fail(std::string(name) + " must be >= 1 or None (no limit); got " + std::to_string(*size));
    }
  };
  check_positive("min_size", min_size);
  check_positive("max_size", max_size);
  // feasible sizes satisfy min_size <= T / k <= ceil(T / k) <= max_size, so min <= max too:
  // checked this way, the message names the size that is out
  const std::string where = " is infeasible for k=" + ks + ", T=" + ts;
  if (min_size && *min_size > T / k) {
    Fail("min_size=" + std::to_string(*min_size) + where + " (k * min_size > T); use min_size <= " +
         "T // k = " + std::to_string(T / k) + " or None");
  }
  const int64_t ceil_t_k = (T + k - 1) / k;
  if (max_size && *max_size < ceil_t_k) {
    Fail("max_size=" + std::to_string(*max_size) + where + " (k * max_size < T); use max_size " +
         ">= ceil(T / k) = " + std::to_string(ceil_t_k) + " or None");
  }
  return {min_size.value_or(1), std::min(max_size.value_or(T), T)};
}

// Costs of the half-open interval [l, r), l < r. The numpy twin repeats this arithmetic
// operation for operation so both backends produce bit-identical tables.
class L1Cost {
 public:
  L1Cost(const double* v, int64_t T, int direction) : x_(T), p_(T + 1, 0.0) {
    // Shifting by an element of v (exact for integer data) and flipping a non-increasing
    // sequence leave every |v_t - v_c| unchanged.
    const double ref = v[(T - 1) / 2];
    for (int64_t t = 0; t < T; ++t) {
      x_[t] = v[t] - ref;
      if (direction < 0) x_[t] = -x_[t];
      p_[t + 1] = p_[t] + x_[t];
    }
  }
  double operator()(int64_t l, int64_t r) const {
    const int64_t c = l + (r - l - 1) / 2;
    const double xc = x_[c];
    const double left = xc * static_cast<double>(c - l) - (p_[c] - p_[l]);
    const double right = (p_[r] - p_[c + 1]) - xc * static_cast<double>(r - c - 1);
    return left + right;
  }

 private:
  std::vector<double> x_, p_;
};

class L2Cost {
 public:
  L2Cost(const double* v, int64_t T) : s1_(T + 1, 0.0), s2_(T + 1, 0.0) {
    double total = 0.0;
    for (int64_t t = 0; t < T; ++t) total += v[t];
    const double mean = total / static_cast<double>(T);
    // Centre on the element nearest the mean: as stable as the mean itself, and exact on
    // integer data, so equal-cost intervals get bit-equal costs there.
    int64_t ref = 0;
    for (int64_t t = 1; t < T; ++t) {
      if (std::abs(v[t] - mean) < std::abs(v[ref] - mean)) ref = t;
    }
    for (int64_t t = 0; t < T; ++t) {
      const double x = v[t] - v[ref];
      s1_[t + 1] = s1_[t] + x;
      s2_[t + 1] = s2_[t] + x * x;
    }
  }
  // (n q - s^2) / n: one rounding after an exact numerator (integer data), instead of two.
  double operator()(int64_t l, int64_t r) const {
    const double n = static_cast<double>(r - l);
    const double s = s1_[r] - s1_[l];
    const double q = s2_[r] - s2_[l];
    return std::max((n * q - s * s) / n, 0.0);
  }

 private:
  std::vector<double> s1_, s2_;
};

class AffinityCost {
 public:
  AffinityCost(const double* a, int64_t T) : n_(T + 1), rows_(new double[T * (T + 1)]) {
    // Rows in groups of kGroup: independent add chains instead of one latency-bound chain.
    constexpr int64_t kGroup = 4;
    for (int64_t c0 = 0; c0 < T; c0 += kGroup) {
      const int64_t c1 = std::min(c0 + kGroup, T);
      for (int64_t c = c0; c < c1; ++c) rows_[c * n_] = 0.0;
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t c = c0; c < c1; ++c) rows_[c * n_ + t + 1] = rows_[c * n_ + t] + a[c * T + t];
      }
    }
  }
  double operator()(int64_t l, int64_t r) const {
    const double* row = Row(l + (r - l - 1) / 2);
    return -(row[r] - row[l]);
  }
  const double* Row(int64_t c) const { return rows_.get() + c * n_; }

 private:
  int64_t n_;
  std::unique_ptr<double[]> rows_;  // [T, T + 1] row prefix sums; not zero-filled first
};

class MatrixCost {
 public:
  MatrixCost(const double* m, int64_t T) : m_(m), T_(T) {}
  double operator()(int64_t l, int64_t r) const { return m_[l * T_ + r - 1]; }

 private:
  const double* m_;
  int64_t T_;
};

struct Layer {
  int64_t lo, hi;  // the i that lie on some feasible split with m clusters before i
};

Layer LayerRange(int64_t T, int64_t k, int64_t m, const Window& w) {
  return {std::max(m * w.min_size, T - (k - m) * w.max_size),
          std::min(m * w.max_size, T - (k - m) * w.min_size)};
}

struct LayerArgs {
  const double* prev;  // D[m - 1][.]
  double* cur;         // D[m][.], +inf on entry
  int64_t* arg;        // argmin table row m
  Layer pl, cl;        // feasible j (layer m - 1) and i (layer m)
  Window w;
};

// For each i, j runs over [max(pl.lo, i - max), min(pl.hi, i - min)] in increasing order.
template <class Cost>
void QuadraticLayerByI(const Cost& cost, const LayerArgs& a) {
  for (int64_t i = a.cl.lo; i <= a.cl.hi; ++i) {
    const int64_t j_hi = std::min(a.pl.hi, i - a.w.min_size);
    double best = kInf;
    int64_t best_j = -1;
    for (int64_t j = std::max(a.pl.lo, i - a.w.max_size); j <= j_hi; ++j) {
      const double v = a.prev[j] + cost(j, i);
      if (v < best) {
        best = v;
        best_j = j;
      }
    }
    a.cur[i] = best;
    a.arg[i] = best_j;
  }
}

// Same candidates and the same smallest-j rule (j ascends in the outer loop, `<` is strict),
// ordered so that a row of the cost matrix is read contiguously.
template <class Cost>
void QuadraticLayerByJ(const Cost& cost, const LayerArgs& a) {
  for (int64_t j = a.pl.lo; j <= a.pl.hi; ++j) {
    const double dj = a.prev[j];
    const int64_t i_hi = std::min(a.cl.hi, j + a.w.max_size);
    for (int64_t i = std::max(a.cl.lo, j + a.w.min_size); i <= i_hi; ++i) {
      const double v = dj + cost(j, i);
      if (v < a.cur[i]) {
        a.cur[i] = v;
        a.arg[i] = j;
      }
    }
  }
}

// The same candidates visited centre by centre, so each interval's cost reads one prefix-sum
// row outward from c (sequential) instead of a new row per candidate. The visiting order no
// longer follows j, so ties compare j explicitly: the smallest minimising j still wins.
void AffinityLayerByCentre(const AffinityCost& cost, const LayerArgs& a) {
  const int64_t c_end = (a.pl.hi + a.cl.hi - 1) / 2;
  for (int64_t c = a.pl.lo; c <= c_end; ++c) {
    const double* row = cost.Row(c);
    // Interval [c - h, c + h + e), e = 1 (odd size) or 2 (even size), has centre c.
    for (int64_t h = std::max<int64_t>(0, (a.w.min_size - 2) / 2); c - h >= a.pl.lo; ++h) {
      const int64_t l = c - h;
      if (c + h + 1 > a.cl.hi || 2 * h + 1 > a.w.max_size) break;
      if (l > a.pl.hi) continue;
      for (int64_t r = c + h + 1; r <= std::min(c + h + 2, a.cl.hi); ++r) {
        if (r < a.cl.lo || r - l < a.w.min_size || r - l > a.w.max_size) continue;
        const double v = a.prev[l] + -(row[r] - row[l]);
        if (v < a.cur[r] || (v == a.cur[r] && l < a.arg[r])) {
          a.cur[r] = v;
          a.arg[r] = l;
        }
      }
    }
  }
}

// Solves i in [lo, hi] knowing that their leftmost argmins lie in [opt_lo, opt_hi].
template <class Cost>
void DivideConquer(const Cost& cost, const LayerArgs& a, int64_t lo, int64_t hi, int64_t opt_lo,
                   int64_t opt_hi) {
  if (lo > hi) return;
  const int64_t mid = lo + (hi - lo) / 2;
  const int64_t j_lo = std::max({opt_lo, a.pl.lo, mid - a.w.max_size});
  const int64_t j_hi = std::min({opt_hi, a.pl.hi, mid - a.w.min_size});
  double best = kInf;
  int64_t best_j = -1;
  for (int64_t j = j_lo; j <= j_hi; ++j) {
    const double v = a.prev[j] + cost(j, mid);
    if (v < best) {
      best = v;
      best_j = j;
    }
  }
  // Cannot happen: the window of mid always meets [opt_lo, opt_hi] (see the header).
  if (best_j < 0) throw std::logic_error("interval DP: empty divide-and-conquer window");
  a.cur[mid] = best;
  a.arg[mid] = best_j;
  DivideConquer(cost, a, lo, mid - 1, opt_lo, best_j);
  DivideConquer(cost, a, mid + 1, hi, best_j, opt_hi);
}

enum class Scan { kByI, kByJ, kByCentre, kDivideConquer };

template <class Cost>
IntervalSplit RunDp(const Cost& cost, int64_t T, int64_t k, const Window& w, Scan scan) {
  const int64_t n = T + 1;
  std::vector<double> d((k + 1) * n, kInf);
  std::vector<int64_t> arg((k + 1) * n, -1);
  d[0] = 0.0;
  Layer pl{0, 0};
  for (int64_t m = 1; m <= k; ++m) {
    const Layer cl = LayerRange(T, k, m, w);
    const LayerArgs a{d.data() + (m - 1) * n, d.data() + m * n, arg.data() + m * n, pl, cl, w};
    if (scan == Scan::kDivideConquer) {
      DivideConquer(cost, a, cl.lo, cl.hi, pl.lo, pl.hi);
    } else if (scan == Scan::kByJ) {
      QuadraticLayerByJ(cost, a);
    } else if (scan == Scan::kByCentre) {
      if constexpr (std::is_same_v<Cost, AffinityCost>) AffinityLayerByCentre(cost, a);
    } else {
      QuadraticLayerByI(cost, a);
    }
    pl = cl;
  }
  IntervalSplit out{std::vector<int64_t>(k + 1), d[k * n + T]};
  out.bounds[k] = T;
  for (int64_t m = k; m >= 1; --m) {
    out.bounds[m - 1] = arg[m * n + out.bounds[m]];
    if (out.bounds[m - 1] < 0) throw std::logic_error("interval DP: broken backtrack");
  }
  return out;
}

}  // namespace

CostKind ParseCostKind(const std::string& name) {
  if (name == "l1") return CostKind::kL1;
  if (name == "l2") return CostKind::kL2;
  if (name == "affinity") return CostKind::kAffinity;
  if (name == "matrix") return CostKind::kMatrix;
  Fail("cost must be one of 'l1', 'l2', 'affinity', 'matrix'; got '" + name + "'");
}

Algorithm ParseAlgorithm(const std::string& name) {
  if (name == "auto") return Algorithm::kAuto;
  if (name == "quadratic") return Algorithm::kQuadratic;
  if (name == "dc") return Algorithm::kDivideConquer;
  Fail("algorithm must be one of 'auto', 'quadratic', 'dc'; got '" + name + "'");
}

IntervalSplit SolveIntervals(const CostInput& input, int64_t k, std::optional<int64_t> min_size,
                             std::optional<int64_t> max_size, Algorithm algorithm) {
  int direction = 0;
  const int64_t T = ValidateInput(input, &direction);
  const Window w = ValidateSizes(T, k, min_size, max_size);
  CheckMagnitude(input, T, k);
  const bool monge = input.kind == CostKind::kL1 || (input.kind == CostKind::kL2 && direction);
  if (algorithm == Algorithm::kDivideConquer && !monge) {
    Fail(std::string("algorithm='dc' needs the quadrangle inequality: cost='l1', or cost='l2' ") +
         "with monotone values; got " +
         (input.kind == CostKind::kL2
              ? "cost='l2' with non-monotone values"
              : (input.kind == CostKind::kAffinity ? "cost='affinity'" : "cost='matrix'")));
  }
  const bool dc = algorithm == Algorithm::kDivideConquer ||
                  (algorithm == Algorithm::kAuto && monge && T > kAutoDcMinT);
  const Scan scan = dc ? Scan::kDivideConquer : Scan::kByI;
  switch (input.kind) {
    case CostKind::kL1:
      return RunDp(L1Cost(input.data, T, direction), T, k, w, scan);
    case CostKind::kL2:
      return RunDp(L2Cost(input.data, T), T, k, w, scan);
    case CostKind::kAffinity:
      return RunDp(AffinityCost(input.data, T), T, k, w, Scan::kByCentre);
    case CostKind::kMatrix:
      return RunDp(MatrixCost(input.data, T), T, k, w, Scan::kByJ);
  }
  throw std::logic_error("interval DP: unhandled cost kind");
}

}  // namespace ant
