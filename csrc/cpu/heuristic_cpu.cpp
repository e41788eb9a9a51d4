// CPU kernel of the regret heuristic (torchrec_esd/dispatch/heuristic.py), equal bit for bit
// to its numpy reference (tests/test_dispatch_kernels.py):
//
// heuristic_total_solve: the regret heuristic of HeuristicDispatcher(objective="total",
//   improve_sweeps=0): price_greedy (dual_prices' Jacobi sweeps, then greedy_rounds on the
//   price-adjusted costs) and the lower bound dual_value of the prices.  The sums that pick
//   the best prices are numpy's (0.0 + pairwise sum, numpy_sum in numpy_sum.h), so the same prices
//   win.  O(sweeps B W + rounds B W) with at most W rounds, plus an O(B) selection per
//   worker and sweep.
#include <torch/library.h>
#include <torch/types.h>

#include "numpy_sum.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace torchrec_esd {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();


// sum_w shares[w] * u[w] as numpy computes (shf * u).sum().
double shares_dot(const std::vector<double>& shf, const std::vector<double>& u) {
  std::vector<double> p(u.size());
  for (size_t w = 0; w < u.size(); ++w) p[w] = shf[w] * u[w];
  return numpy_sum(p);
}

// lower_bound._best_two on the rows of r = cost - u (row-major [B, W]): first index of the
// minimum, the minimum, the minimum over the other columns (inf with one column).
void best_two(const double* cost, const std::vector<double>& u, int64_t B, int64_t W, std::vector<int64_t>& bi,
              std::vector<double>& bv, std::vector<double>& sv) {
  for (int64_t s = 0; s < B; ++s) {
    const double* row = cost + s * W;
    int64_t ib = 0;
    double v1 = row[0] - u[0], v2 = kInf;
    for (int64_t w = 1; w < W; ++w) {
      const double v = row[w] - u[w];
      if (v < v1) {
        v2 = v1;
        v1 = v;
        ib = w;
      } else if (v < v2) {
        v2 = v;
      }
    }
    bi[s] = ib;
    bv[s] = v1;
    sv[s] = v2;
  }
}

// The k-th smallest (0-based) of a[0..n) (finite values), what np.partition(a, k)[k] gives:
// the value is unique whatever the method.  A strided sample of the column brackets the rank
// k; one pass counts the values below the bracket and keeps those inside; a selection among
// those finishes (a full std::nth_element on a copy when the bracket misses).  O(n).
double kth_smallest(const double* a, int64_t n, int64_t k, std::vector<double>& buf) {
  constexpr int64_t kSample = 256, kMargin = 16;
  if (n <= 8 * kSample) {
    buf.assign(a, a + n);
    std::nth_element(buf.begin(), buf.begin() + k, buf.end());
    return buf[k];
  }
  double smp[kSample];
  const int64_t step = n / kSample;
  for (int64_t i = 0; i < kSample; ++i) smp[i] = a[i * step];
  std::sort(smp, smp + kSample);
  const int64_t q = static_cast<int64_t>(static_cast<double>(k) / static_cast<double>(n) * kSample);
  const double lo = smp[std::max<int64_t>(0, q - kMargin)];
  const double hi = smp[std::min<int64_t>(kSample - 1, q + kMargin)];
  int64_t below = 0;
  buf.clear();
  for (int64_t i = 0; i < n; ++i) {
    const double x = a[i];
    if (x < lo) ++below;
    else if (x <= hi) buf.push_back(x);
  }
  const int64_t inside = static_cast<int64_t>(buf.size());
  if (below <= k && k < below + inside) {
    std::nth_element(buf.begin(), buf.begin() + (k - below), buf.end());
    return buf[k - below];
  }
  buf.assign(a, a + n);
  std::nth_element(buf.begin(), buf.begin() + k, buf.end());
  return buf[k];
}

// lower_bound.dual_prices (u0 = 0): the best prices over sweeps + 1 evaluations of LB(u).
std::vector<double> dual_prices(const double* cost, const std::vector<int64_t>& sh, int64_t B, int64_t W,
                                int64_t sweeps) {
  std::vector<double> shf(W), u(W, 0.0), best_u(W, 0.0), col(B), dt(static_cast<size_t>(B * W));
  for (int64_t w = 0; w < W; ++w) shf[w] = static_cast<double>(sh[w]);
  double best_v = -kInf;
  std::vector<int64_t> bi(B);
  std::vector<double> bv(B), sv(B);
  sweeps = std::max<int64_t>(0, sweeps);
  for (int64_t it = 0; it <= sweeps; ++it) {
    best_two(cost, u, B, W, bi, bv, sv);
    const double v = numpy_sum(bv) + shares_dot(shf, u);
    if (v > best_v) {
      best_u = u;
      best_v = v;
    }
    if (it == sweeps) break;
    // d[s, w] = c[s, w] - min_{w' != w} (c[s, w'] - u_w'), column-major; the k-th smallest per column
    // (in blocks of rows, so that the writes run along the columns)
    constexpr int64_t kBlock = 256;
    for (int64_t s0 = 0; s0 < B; s0 += kBlock) {
      const int64_t s1 = std::min(B, s0 + kBlock);
      for (int64_t w = 0; w < W; ++w) {
        double* dcol = dt.data() + w * B;
        for (int64_t s = s0; s < s1; ++s) dcol[s] = cost[s * W + w] - bv[s];
      }
      for (int64_t s = s0; s < s1; ++s) dt[bi[s] * B + s] = cost[s * W + bi[s]] - sv[s];
    }
    std::vector<double> nu(W);
    for (int64_t w = 0; w < W; ++w) {
      const int64_t k = sh[w];
      double x;
      const double* dcol = dt.data() + w * B;
      if (k <= 0) {
        x = *std::min_element(dcol, dcol + B);
      } else if (k >= B) {
        x = *std::max_element(dcol, dcol + B);
      } else {
        x = kth_smallest(dt.data() + w * B, B, k - 1, col);
      }
      nu[w] = std::isfinite(x) ? x : 0.0;
    }
    u = nu;
  }
  return best_u;
}

// heuristic.greedy_rounds(score, shares) with the regret priority; score row-major [B, W].
void greedy_rounds(const double* score, std::vector<int64_t> rem, int64_t B, int64_t W, int64_t* out) {
  std::vector<int64_t> un(B), open_w, best(B), acc_flag(B);
  std::vector<double> prio(B);
  for (int64_t s = 0; s < B; ++s) un[s] = s;
  std::vector<std::vector<int64_t>> want(W);  // per worker, positions in un proposing it
  while (!un.empty()) {
    open_w.clear();
    for (int64_t w = 0; w < W; ++w)
      if (rem[w] > 0) open_w.push_back(w);
    TORCH_CHECK(!open_w.empty(), "torchrec_esd::heuristic_total_solve: no worker has room left");
    const int64_t n = static_cast<int64_t>(un.size());
    if (open_w.size() == 1) {
      for (int64_t i = 0; i < n; ++i) out[un[i]] = open_w[0];
      break;
    }
    for (auto& v : want) v.clear();
    for (int64_t i = 0; i < n; ++i) {
      const double* row = score + un[i] * W;
      int64_t ib = open_w[0];
      double v1 = row[ib], v2 = kInf;
      for (size_t j = 1; j < open_w.size(); ++j) {
        const double v = row[open_w[j]];
        if (v < v1) {
          v2 = v1;
          v1 = v;
          ib = open_w[j];
        } else if (v < v2) {
          v2 = v;
        }
      }
      best[i] = ib;
      prio[i] = v2 - v1;
      acc_flag[i] = 0;
      want[ib].push_back(i);
    }
    // each worker keeps its rem highest-regret proposals (ties: lower sample index)
    auto before = [&](int64_t a, int64_t b) {
      const double pa = -prio[a], pb = -prio[b];
      if (pa < pb) return true;
      if (pb < pa) return false;
      return un[a] < un[b];
    };
    for (int64_t w : open_w) {
      auto& v = want[w];
      const int64_t take = std::min<int64_t>(rem[w], static_cast<int64_t>(v.size()));
      if (take < static_cast<int64_t>(v.size()) && take > 0)
        std::nth_element(v.begin(), v.begin() + (take - 1), v.end(), before);
      for (int64_t j = 0; j < take; ++j) {
        acc_flag[v[j]] = 1;
        out[un[v[j]]] = w;
      }
      rem[w] -= take;
    }
    std::vector<int64_t> left;
    left.reserve(n);
    for (int64_t i = 0; i < n; ++i)
      if (!acc_flag[i]) left.push_back(un[i]);
    un.swap(left);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> heuristic_total_solve_cpu(const at::Tensor& cost,
                                                                       const at::Tensor& shares,
                                                                       int64_t price_sweeps) {
  const char* op = "torchrec_esd::heuristic_total_solve: ";
  TORCH_CHECK(cost.device().is_cpu() && cost.scalar_type() == at::kDouble && cost.dim() == 2, op,
              "cost must be a float64 CPU [B, W] matrix");
  TORCH_CHECK(shares.device().is_cpu() && shares.scalar_type() == at::kLong && shares.dim() == 1 &&
                  shares.numel() == cost.size(1),
              op, "shares must be an int64 CPU vector with one entry per cost column");
  const at::Tensor c = cost.contiguous();
  const int64_t B = c.size(0), W = c.size(1);
  TORCH_CHECK(W >= 1 || B == 0, op, "a batch needs at least one worker");
  const at::Tensor shc = shares.contiguous();
  std::vector<int64_t> sh(shc.data_ptr<int64_t>(), shc.data_ptr<int64_t>() + W);
  int64_t total = 0;
  for (int64_t w = 0; w < W; ++w) {
    TORCH_CHECK(sh[w] >= 0, op, "shares must be >= 0, got ", sh[w], " for worker ", w);
    total += sh[w];
  }
  TORCH_CHECK(total == B, op, "shares add up to ", total, ", batch has ", B, " samples");
  const double* cp = c.data_ptr<double>();
  std::vector<double> u(W, 0.0);
  // (an empty batch keeps u = 0: numpy's reference cannot reduce an empty column)
  if (price_sweeps > 0 && W > 1 && B > 0) u = dual_prices(cp, sh, B, W, price_sweeps);
  auto assignment = at::empty({B}, c.options().dtype(at::kLong));
  if (B > 0) {
    std::vector<double> score(static_cast<size_t>(B * W));
    for (int64_t s = 0; s < B; ++s)
      for (int64_t w = 0; w < W; ++w) score[s * W + w] = cp[s * W + w] - u[w];
    greedy_rounds(score.data(), sh, B, W, assignment.data_ptr<int64_t>());
  }
  // dual_value(cost, shares, u): the row minima of cost - u summed, plus shares . u
  std::vector<double> mins(B), shf(W);
  for (int64_t s = 0; s < B; ++s) {
    double m = cp[s * W] - u[0];
    for (int64_t w = 1; w < W; ++w) m = std::min(m, cp[s * W + w] - u[w]);
    mins[s] = m;
  }
  for (int64_t w = 0; w < W; ++w) shf[w] = static_cast<double>(sh[w]);
  auto prices = at::empty({W}, c.options());
  std::copy(u.begin(), u.end(), prices.data_ptr<double>());
  auto lb = at::full({}, W > 0 ? numpy_sum(mins) + shares_dot(shf, u) : 0.0, c.options());
  return {assignment, prices, lb};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("heuristic_total_solve", &heuristic_total_solve_cpu);
}

}  // namespace torchrec_esd
