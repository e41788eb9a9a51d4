// CPU kernel of dedup_start: the esd dispatcher's start assignment in one call
// (torchrec_esd.dispatch.dedup_search.start_reference, numpy, is the reference the
// tests compare it to: the same assignment bit for bit).
//
// 1. Amortised matrix (torchrec_esd.cost.DedupCost.amortised_matrix): per row x
//    used by n_x samples, h[x, w] = (pull[x, w] + p[n_x, w] push[x, w]) / m[n_x, w]
//    plus, for a row held dirty by o_x, owner_push[x] / max(n_x, 1) (times
//    p[n_x, o_x] on the owner's column); m and p come as tables indexed by n
//    (torchrec_esd.cost.dedup.amortise_table: numpy computes them, so their
//    pow is numpy's); A[s, w] = sum of h[x, w] over s's rows, in occurrence
//    order from 0 (the reference's index_add_).
// 2. Dual prices (torchrec_esd.dispatch.lower_bound.dual_prices from u = 0,
//    `price_sweeps` Jacobi sweeps, the prices with the best LB(u) kept; LB sums
//    in numpy's pairwise order so that ties resolve as in numpy).
// 3. Regret greedy on A - u (torchrec_esd.dispatch.heuristic.greedy_rounds):
//    rounds of proposals to the cheapest open worker, each worker keeping the
//    highest-regret ones (ties: lower sample index) up to its remaining share.
//
// Only IEEE-exact operations (+, -, *, /, comparisons) in the reference's
// order, and no FMA contraction (the extension is built without -mfma), so
// the result equals the numpy path's.  Cost: O(N + U W) for the matrix,
// O(B W) per sweep (nth_element per worker), at most W greedy rounds of
// O(B W + B log B).  Memory O((U + B) W).
#include <torch/library.h>
#include <torch/types.h>

#include "../esd_checks.h"
#include "numpy_sum.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

namespace torchrec_esd {

namespace {

constexpr const char* kOp = "dedup_start";



// per row of r [B, W] (columns `cols`): first argmin (position in cols), the
// minimum, the minimum without it (inf with one column)
void best_two(const double* r, int64_t W, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& cols, std::vector<int64_t>& bi, std::vector<double>& bv,
              std::vector<double>& sv) {
  const int64_t n = static_cast<int64_t>(rows.size()), c = static_cast<int64_t>(cols.size());
  bi.resize(n);
  bv.resize(n);
  sv.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const double* row = r + rows[i] * W;
    int64_t b = 0;
    double v = row[cols[0]];
    for (int64_t j = 1; j < c; ++j)
      if (row[cols[j]] < v) {
        v = row[cols[j]];
        b = j;
      }
    double s = std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < c; ++j)
      if (j != b && row[cols[j]] < s) s = row[cols[j]];
    bi[i] = b;
    bv[i] = v;
    sv[i] = s;
  }
}

// dual_prices(cost, shares, sweeps) from u = 0
std::vector<double> dual_prices(const std::vector<double>& cost, int64_t B, int64_t W,
                                const std::vector<int64_t>& shares, int64_t sweeps) {
  std::vector<double> u(W, 0.0), best_u(u), r(B * W), d(B * W), col(B), bv, sv, su(W);
  std::vector<int64_t> bi, rows(B), cols(W);
  std::iota(rows.begin(), rows.end(), 0);
  std::iota(cols.begin(), cols.end(), 0);
  double best_v = -std::numeric_limits<double>::infinity();
  const int64_t n = std::max<int64_t>(0, sweeps);
  for (int64_t it = 0; it <= n; ++it) {
    for (int64_t s = 0; s < B; ++s)
      for (int64_t w = 0; w < W; ++w) r[s * W + w] = cost[s * W + w] - u[w];
    best_two(r.data(), W, rows, cols, bi, bv, sv);
    for (int64_t w = 0; w < W; ++w) su[w] = static_cast<double>(shares[w]) * u[w];
    const double v = numpy_sum(bv) + numpy_sum(su);
    if (v > best_v) {
      best_u = u;
      best_v = v;
    }
    if (it == n) break;
    for (int64_t s = 0; s < B; ++s) {
      for (int64_t w = 0; w < W; ++w) d[s * W + w] = cost[s * W + w] - bv[s];
      d[s * W + bi[s]] = cost[s * W + bi[s]] - sv[s];
    }
    for (int64_t w = 0; w < W; ++w) {
      for (int64_t s = 0; s < B; ++s) col[s] = d[s * W + w];
      const int64_t k = shares[w];
      double x;
      if (k <= 0) {
        x = *std::min_element(col.begin(), col.end());
      } else if (k >= B) {
        x = *std::max_element(col.begin(), col.end());
      } else {
        std::nth_element(col.begin(), col.begin() + (k - 1), col.end());
        x = col[k - 1];
      }
      u[w] = std::isfinite(x) ? x : 0.0;
    }
  }
  return best_u;
}

// greedy_rounds(score, shares) with the regret priority
std::vector<int64_t> greedy_rounds(const std::vector<double>& score, int64_t B, int64_t W,
                                   const std::vector<int64_t>& shares) {
  std::vector<int64_t> rem(shares), out(B, -1), un(B), open, bi, order, next;
  std::iota(un.begin(), un.end(), 0);
  std::vector<double> bv, sv, prio;
  std::vector<int64_t> best;
  while (!un.empty()) {
    open.clear();
    for (int64_t w = 0; w < W; ++w)
      if (rem[w] > 0) open.push_back(w);
    TORCH_CHECK(!open.empty(), "torchrec_esd::", kOp, ": no open worker left (shares)");
    if (open.size() == 1) {
      for (const int64_t s : un) out[s] = open[0];
      break;
    }
    best_two(score.data(), W, un, open, bi, bv, sv);
    const int64_t n = static_cast<int64_t>(un.size());
    prio.resize(n);
    best.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      prio[i] = sv[i] - bv[i];
      best[i] = open[bi[i]];
    }
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
    // numpy's lexsort((un, -prio, best)): by worker, highest regret, lower sample
    std::sort(order.begin(), order.end(), [&](int64_t i, int64_t j) {
      if (best[i] != best[j]) return best[i] < best[j];
      const double a = -prio[i], b = -prio[j];
      if (a < b) return true;
      if (b < a) return false;
      return un[i] < un[j];
    });
    std::vector<int64_t> taken(W, 0);
    next.clear();
    for (const int64_t i : order) {
      const int64_t w = best[i];
      if (taken[w] < rem[w]) {
        out[un[i]] = w;
        ++taken[w];
      } else {
        next.push_back(un[i]);
      }
    }
    for (int64_t w = 0; w < W; ++w) rem[w] -= taken[w];
    std::sort(next.begin(), next.end());
    un.swap(next);
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dedup_start_cpu(
    const at::Tensor& occ_s, const at::Tensor& occ_k, const at::Tensor& pull,
    const at::Tensor& push, const at::Tensor& owner, const at::Tensor& owner_push,
    const at::Tensor& divisor, const at::Tensor& p_shared, at::IntArrayRef shares,
    int64_t price_sweeps) {
  check_dedup_model(kOp, occ_s, occ_k, pull, push, owner, owner_push);
  check_cpu_tensor(kOp, "divisor", divisor, at::kDouble, 2);
  check_cpu_tensor(kOp, "p_shared", p_shared, at::kDouble, 2);
  const int64_t N = occ_s.numel(), U = pull.size(0), W = pull.size(1);
  const int64_t T = divisor.size(0);
  TORCH_CHECK(divisor.size(1) == W && p_shared.sizes() == divisor.sizes(), "torchrec_esd::", kOp,
              ": divisor and p_shared must be [T, ", W, "] tables, got ", divisor.sizes(), " and ",
              p_shared.sizes());
  TORCH_CHECK(static_cast<int64_t>(shares.size()) == W, "torchrec_esd::", kOp, ": ",
              shares.size(), " shares for ", W, " workers");
  int64_t B = 0;
  for (int64_t w = 0; w < W; ++w) {
    TORCH_CHECK(shares[w] >= 0, "torchrec_esd::", kOp, ": shares must be >= 0, got ", shares);
    B += shares[w];
  }
  const int64_t* s = occ_s.data_ptr<int64_t>();
  const int64_t* k = occ_k.data_ptr<int64_t>();
  const int64_t* own = owner.data_ptr<int64_t>();
  const double* p = pull.data_ptr<double>();
  const double* q = push.data_ptr<double>();
  const double* op = owner_push.data_ptr<double>();
  const double* mt = divisor.data_ptr<double>();
  const double* pt = p_shared.data_ptr<double>();
  std::vector<int64_t> uses(U, 0);
  check_occurrences(kOp, s, k, N, B, U, " (B = sum of shares)", [&](int64_t i) { ++uses[k[i]]; });
  for (int64_t x = 0; x < U; ++x) {
    TORCH_CHECK(uses[x] < T, "torchrec_esd::", kOp, ": row ", x, " has ", uses[x],
                " uses, the tables have ", T, " rows");
    TORCH_CHECK(own[x] >= -1 && own[x] < W, "torchrec_esd::", kOp, ": owner[", x, "] = ", own[x],
                " is neither -1 nor a worker in [0, ", W, ")");
  }
  // 1. amortised per-row costs, summed per sample in occurrence order
  std::vector<double> h(U * W);
  for (int64_t x = 0; x < U; ++x) {
    const int64_t n = uses[x];
    const double* m_n = mt + n * W;
    const double* p_n = pt + n * W;
    double* hx = &h[x * W];
    for (int64_t w = 0; w < W; ++w) hx[w] = (p[x * W + w] + p_n[w] * q[x * W + w]) / m_n[w];
    if (own[x] >= 0) {
      const double share = op[x] / std::max(static_cast<double>(n), 1.0);
      for (int64_t w = 0; w < W; ++w) hx[w] = hx[w] + (w == own[x] ? share * p_n[w] : share);
    }
  }
  std::vector<double> cost(B * W, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    double* c = &cost[s[i] * W];
    const double* hx = &h[k[i] * W];
    for (int64_t w = 0; w < W; ++w) c[w] += hx[w];
  }
  // 2. prices, 3. greedy on the price-adjusted costs
  const std::vector<int64_t> sh(shares.begin(), shares.end());
  std::vector<double> u(W, 0.0);
  if (price_sweeps > 0 && W > 1) u = dual_prices(cost, B, W, sh, price_sweeps);
  for (int64_t i = 0; i < B; ++i)
    for (int64_t w = 0; w < W; ++w) cost[i * W + w] -= u[w];
  const std::vector<int64_t> a = greedy_rounds(cost, B, W, sh);
  auto out = at::empty({B}, at::TensorOptions().dtype(at::kLong));
  std::copy(a.begin(), a.end(), out.data_ptr<int64_t>());
  auto prices = at::empty({W}, at::TensorOptions().dtype(at::kDouble));
  std::copy(u.begin(), u.end(), prices.data_ptr<double>());
  return {out, prices};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("dedup_start", &dedup_start_cpu); }

}  // namespace torchrec_esd
