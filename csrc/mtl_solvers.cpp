#include "mtl_solvers.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace ant {
namespace {

void CheckK(int64_t k) {
  if (k < 1) {
    throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  }
}

// x := H^{-1} x for a symmetric positive definite row-major [k, k] H (Cholesky, H overwritten).
// A non-positive pivot (H not definite, or NaN) leaves NaN in x, as no solution is meaningful.
void SolveSpd(std::vector<double>& h, std::vector<double>& x, int64_t k) {
  for (int64_t j = 0; j < k; ++j) {
    double d = h[j * k + j];
    for (int64_t m = 0; m < j; ++m) d -= h[j * k + m] * h[j * k + m];
    const double l = std::sqrt(d);  // NaN when d < 0
    h[j * k + j] = l;
    for (int64_t i = j + 1; i < k; ++i) {
      double s = h[i * k + j];
      for (int64_t m = 0; m < j; ++m) s -= h[i * k + m] * h[j * k + m];
      h[i * k + j] = s / l;
    }
  }
  for (int64_t i = 0; i < k; ++i) {  // L y = x
    double s = x[i];
    for (int64_t m = 0; m < i; ++m) s -= h[i * k + m] * x[m];
    x[i] = s / h[i * k + i];
  }
  for (int64_t i = k - 1; i >= 0; --i) {  // L^T x = y
    double s = x[i];
    for (int64_t m = i + 1; m < k; ++m) s -= h[m * k + i] * x[m];
    x[i] = s / h[i * k + i];
  }
}

}  // namespace

void PcgradWeights(const double* gram, const int64_t* orders, int64_t k, double* weights) {
  CheckK(k);
  std::vector<double> c(static_cast<size_t>(k * k), 0.0);
  for (int64_t i = 0; i < k; ++i) c[i * k + i] = 1.0;
  for (int64_t t = 0; t < k; ++t) {
    for (int64_t i = 0; i < k; ++i) {  // rows are independent: each reads only its own row
      const int64_t j = orders[i * k + t];
      if (j < 0 || j >= k) continue;
      double d = 0.0;
      for (int64_t m = 0; m < k; ++m) d += c[i * k + m] * gram[m * k + j];
      const double gjj = gram[j * k + j];
      if (d < 0.0 && gjj != 0.0) c[i * k + j] -= d / gjj;
    }
  }
  double bad = 0.0;  // NaN exactly when G has a NaN or inf entry (a NaN d fails d < 0)
  for (int64_t e = 0; e < k * k; ++e) bad += gram[e] * 0.0;
  for (int64_t m = 0; m < k; ++m) {
    double s = 0.0;
    for (int64_t i = 0; i < k; ++i) s += c[i * k + m];
    weights[m] = s + bad;
  }
}

void NashWeights(const double* gram, int64_t k, int64_t iters, bool normalize, double* alpha) {
  CheckK(k);
  if (iters < 0) {
    throw std::invalid_argument("iters must be >= 0, got " + std::to_string(iters));
  }
  const size_t kk = static_cast<size_t>(k * k);
  double big = 0.0;  // max |G|: the squares are summed relative to it (no overflow/underflow)
  for (size_t e = 0; e < kk; ++e) {
    if (!std::isfinite(gram[e])) {
      for (int64_t i = 0; i < k; ++i) alpha[i] = std::numeric_limits<double>::quiet_NaN();
      return;
    }
    big = std::max(big, std::fabs(gram[e]));
  }
  // Solved on G / ||G||_F whatever `normalize` says (Newton's iterates are invariant under
  // G -> c G, a -> a / sqrt(c)); the norm in two factors, max |G| and the norm of G / max |G|
  // (in [1, k]), so that neither overflows nor underflows
  if (big == 0.0) big = 1.0;
  double rel = 0.0;
  for (size_t e = 0; e < kk; ++e) rel += (gram[e] / big) * (gram[e] / big);
  rel = rel > 0.0 ? std::sqrt(rel) : 1.0;
  // inactive clusters (G[i, i] <= 0): identity row and column, a_i = 1 -> zero gradient and step
  std::vector<char> act(static_cast<size_t>(k));
  for (int64_t i = 0; i < k; ++i) act[i] = gram[i * k + i] / big / rel > 0.0;
  std::vector<double> g(kk);
  for (int64_t i = 0; i < k; ++i) {
    for (int64_t j = 0; j < k; ++j) {
      g[i * k + j] = (act[i] && act[j]) ? gram[i * k + j] / big / rel : (i == j ? 1.0 : 0.0);
    }
  }
  // start a_i = s / sqrt(G_ii), s optimal along that ray
  std::vector<double> u(static_cast<size_t>(k)), a(static_cast<size_t>(k));
  double n = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    u[i] = act[i] ? 1.0 / std::sqrt(g[i * k + i]) : 0.0;
    n += act[i] ? 1.0 : 0.0;
  }
  double q = 0.0;
  for (int64_t i = 0; i < k; ++i) {
    double row = 0.0;
    for (int64_t j = 0; j < k; ++j) row += g[i * k + j] * u[j];
    q += u[i] * row;
  }
  const double s = std::sqrt(n / (q > 0.0 ? q : 1.0));
  for (int64_t i = 0; i < k; ++i) a[i] = act[i] ? s * u[i] : 1.0;

  std::vector<double> grad(static_cast<size_t>(k)), x(static_cast<size_t>(k)), h(kk);
  for (int64_t it = 0; it < iters; ++it) {
    for (int64_t i = 0; i < k; ++i) {
      const double r = 1.0 / a[i];
      double ga = 0.0;
      for (int64_t j = 0; j < k; ++j) ga += g[i * k + j] * a[j];
      grad[i] = ga - r;
      for (int64_t j = 0; j < k; ++j) h[i * k + j] = g[i * k + j];
      h[i * k + i] += r * r;  // H = G + diag(1 / a^2)
    }
    x = grad;
    SolveSpd(h, x, k);
    double dec = 0.0;
    for (int64_t i = 0; i < k; ++i) dec += grad[i] * x[i];
    const double lam = std::sqrt(dec > 0.0 ? dec : 0.0);
    const double step = lam < 0.25 ? 1.0 : 1.0 / (1.0 + lam);
    for (int64_t i = 0; i < k; ++i) a[i] -= step * x[i];
  }
  // a solution or nothing: a_i > 0 and |a_i (G a)_i - 1| <= kNashTol on every active row
  bool solved = true;
  for (int64_t i = 0; i < k; ++i) {
    double ga = 0.0;
    for (int64_t j = 0; j < k; ++j) ga += g[i * k + j] * a[j];
    const double res = std::fabs(a[i] * ga - 1.0);
    if (act[i] && !(res <= kNashTol && a[i] > 0.0)) solved = false;  // also false for NaN
  }
  for (int64_t i = 0; i < k; ++i) {
    if (!normalize) a[i] = a[i] / std::sqrt(big) / std::sqrt(rel);  // G itself: / sqrt(||G||_F)
    alpha[i] = !solved ? std::numeric_limits<double>::quiet_NaN() : act[i] ? a[i] : 0.0;
  }
}

}  // namespace ant
