// Small k x k solvers of the gradient methods, for Gram matrices that live in host memory.
//
// The same maths as ant_kernels' Triton kernels and torch references (pcgrad.py, nash.py,
// reference.py): a CPU training step calls these once per step on a [k, k] matrix, where a
// chain of ~100 (PCGrad) or ~400 (Nash-MTL) tiny torch operators would cost more than the
// arithmetic by three orders of magnitude.
#pragma once

#include <cstdint>

namespace ant {

// Gram-space PCGrad. gram: row-major [k, k]; orders: row-major [k, k], row i the order in which
// g_i' is projected (entries outside [0, k) are skipped). C = I; for t = 0..k-1 and every row i,
// j = orders[i, t]: d = C[i] . G[:, j]; if d < 0 and G[j, j] != 0, C[i, j] -= d / G[j, j].
// weights[m] = sum_i C[i, m], NaN everywhere if G has a NaN or inf entry. Throws
// std::invalid_argument for k < 1.
void PcgradWeights(const double* gram, const int64_t* orders, int64_t k, double* weights);

// Nash-MTL: alpha > 0 with alpha * (G alpha) = 1 by damped Newton (a fixed `iters` steps, no
// early exit) on G / ||G||_F (its norm in two factors: no overflow or underflow at any scale);
// the weights of G itself (divided by sqrt(||G||_F)) unless `normalize`. Clusters with
// G[i, i] <= 0 get weight 0; a non-finite G gives NaN everywhere, and so does a solve that
// ends without a solution (some
// alpha_i <= 0, or |alpha_i (G alpha)_i - 1| > kNashTol). G is meant to be positive
// semidefinite (a Gram matrix): each step factors H = G + diag(1/a^2) by Cholesky, NaN where H
// is not definite. Throws std::invalid_argument for k < 1 or iters < 0.
constexpr double kNashTol = 1e-6;  // as ant_kernels.reference.NASH_TOL
void NashWeights(const double* gram, int64_t k, int64_t iters, bool normalize, double* alpha);

}  // namespace ant
