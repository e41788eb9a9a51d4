// CPU kernel of dedup_decide: the esd dispatcher's whole "total" decision in one
// call, dedup_start (csrc/cpu/dedup_start_cpu.cpp) then dedup_refine
// (csrc/cpu/dedup_refine_cpu.cpp) from its assignment, with the time the start
// took counted in the budget.  One call instead of two: a custom operator
// releases the GIL, and a decision deciding in a background thread while the
// training thread runs Python waits for it again at every release.  The result
// is theirs (the Python path calling both is the reference the tests compare
// it to).
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <tuple>

namespace torchrec_esd {

std::tuple<at::Tensor, at::Tensor> dedup_start_cpu(
    const at::Tensor& occ_s, const at::Tensor& occ_k, const at::Tensor& pull,
    const at::Tensor& push, const at::Tensor& owner, const at::Tensor& owner_push,
    const at::Tensor& divisor, const at::Tensor& p_shared, at::IntArrayRef shares,
    int64_t price_sweeps);

std::tuple<at::Tensor, at::Tensor, at::Tensor> dedup_refine_cpu(
    const at::Tensor& occ_s, const at::Tensor& occ_k, const at::Tensor& pull,
    const at::Tensor& push, const at::Tensor& owner, const at::Tensor& owner_push,
    const at::Tensor& assignment, int64_t max_rounds, double time_budget_s, int64_t group_size);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dedup_decide_cpu(
    const at::Tensor& occ_s, const at::Tensor& occ_k, const at::Tensor& pull,
    const at::Tensor& push, const at::Tensor& owner, const at::Tensor& owner_push,
    const at::Tensor& divisor, const at::Tensor& p_shared, at::IntArrayRef shares,
    int64_t price_sweeps, int64_t max_rounds, double time_budget_s, int64_t group_size) {
  TORCH_CHECK(!std::isnan(time_budget_s), "torchrec_esd::dedup_decide: time_budget_s is NaN");
  const auto t0 = std::chrono::steady_clock::now();
  at::Tensor start = std::get<0>(dedup_start_cpu(occ_s, occ_k, pull, push, owner, owner_push,
                                                 divisor, p_shared, shares, price_sweeps));
  const double spent =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  // inf stays inf; a spent budget gives no pass (dedup_refine's "<= 0")
  const double left = std::isfinite(time_budget_s) ? std::max(time_budget_s - spent, 0.0)
                                                   : time_budget_s;
  auto refined = dedup_refine_cpu(occ_s, occ_k, pull, push, owner, owner_push, start, max_rounds,
                                   left, group_size);
  return {std::get<0>(refined), std::get<1>(refined), std::get<2>(refined), start};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("dedup_decide", &dedup_decide_cpu); }

}  // namespace torchrec_esd
