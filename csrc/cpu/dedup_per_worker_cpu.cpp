// CPU kernel of torchrec_esd::dedup_per_worker: DedupCost.per_worker (torchrec_esd/cost/dedup.py,
// its numpy reference) in one pass: every worker's predicted link seconds for an assignment (its
// pulls, its gradient pushes of shared rows, the dirty rows it pushes).  The stake rule and the
// per-batch shares call it on every decision, and the shares once per candidate.
#include <torch/library.h>
#include <torch/types.h>

#include <cmath>
#include <vector>

#include "../esd_checks.h"

namespace torchrec_esd {

namespace {

constexpr const char* kOp = "dedup_per_worker";

at::Tensor dedup_per_worker_cpu(const at::Tensor& occ_s, const at::Tensor& occ_k, const at::Tensor& pull,
                                const at::Tensor& push, const at::Tensor& owner, const at::Tensor& owner_push,
                                const at::Tensor& assignment) {
  check_dedup_model(kOp, occ_s, occ_k, pull, push, owner, owner_push);
  check_cpu_tensor(kOp, "assignment", assignment, at::kLong, 1);
  const int64_t N = occ_s.numel(), U = pull.size(0), W = pull.size(1), B = assignment.numel();
  const int64_t* a = assignment.data_ptr<int64_t>();
  const int64_t* own = owner.data_ptr<int64_t>();
  check_assignment_workers(kOp, a, B, W);
  check_owners(kOp, own, U, W);
  const int64_t *s = occ_s.data_ptr<int64_t>(), *k = occ_k.data_ptr<int64_t>();
  const double *p = pull.data_ptr<double>(), *q = push.data_ptr<double>(), *op = owner_push.data_ptr<double>();
  // which workers use each row: [U, W] flags from the occurrences
  std::vector<uint8_t> used(static_cast<size_t>(U * W), 0);
  check_occurrences(kOp, s, k, N, B, U, " (the assignment's samples)",
                    [&](int64_t i) { used[k[i] * W + a[s[i]]] = 1; });
  // the reference's order: per worker, the rows' pull (+ push when shared) summed row by row,
  // then the dirty owners' pushes summed row by row, then the two added
  std::vector<double> link(W, 0.0), owned(W, 0.0);
  for (int64_t x = 0; x < U; ++x) {
    const uint8_t* u = &used[x * W];
    int64_t n = 0;
    for (int64_t w = 0; w < W; ++w) n += u[w];
    for (int64_t w = 0; w < W; ++w) {
      const double term = p[x * W + w] * u[w] + (n > 1 ? q[x * W + w] * u[w] : 0.0);
      link[w] += term;
    }
    const int64_t o = own[x];
    if (o >= 0 && n > 0 && !(n == 1 && u[o])) owned[o] += op[x];
  }
  at::Tensor out = at::empty({W}, pull.options());
  double* r = out.data_ptr<double>();
  for (int64_t w = 0; w < W; ++w) r[w] = link[w] + owned[w];
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("dedup_per_worker", &dedup_per_worker_cpu); }

}  // namespace torchrec_esd
