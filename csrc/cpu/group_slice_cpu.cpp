// CPU kernel of GroupInputs.sub_matrix(samples, workers, "expected") (torchrec_esd/cost/
// group_inputs.py, its reference): one group's [B_g, |g|] slice of the expected cost matrix,
// equal bit for bit to the reference (tests/test_dispatch_kernels.py).
//
// Per key x of the group's samples and worker w of the group (column j):
//   own  = cached ? outdated * rt : rt + ev      (rt, ev: w's row time / eviction push of x's table)
//   m    = 1 + (uses_x - 1) max(share_w - 1, 0) / max(1, B - 1)
//   h    = (own + p * rt) / m  (+ owner_push_x / max(uses_x, 1), times p when w is x's dirty owner,
//          when x has one)
// with p = p_shared[uses_index[x], j] (1 - (share_w / B)^(uses_x - 1), computed by numpy in the
// caller so that its pow is numpy's); a sample sums h over its distinct keys, in pair order.
// O(N_g + H_g + U_g |g|) for the group's N_g pairs, H_g cached pairs of its workers and U_g keys.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

namespace torchrec_esd {

namespace {

void check_vec(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.dim() == 1 && t.is_contiguous(),
              "torchrec_esd::group_slice_expected: ", name, " must be a contiguous 1-D CPU ", c10::toString(dt),
              " tensor");
}

}  // namespace

at::Tensor group_slice_expected_cpu(const at::Tensor& samples, const at::Tensor& workers, const at::Tensor& pair_ptr,
                                    const at::Tensor& occ_k, const at::Tensor& hit_ptr, const at::Tensor& hit_key,
                                    const at::Tensor& hit_outdated, const at::Tensor& table_of,
                                    const at::Tensor& row_time, const at::Tensor& evict_time, const at::Tensor& uses,
                                    const at::Tensor& owner, const at::Tensor& owner_push, const at::Tensor& shares,
                                    const at::Tensor& p_shared, const at::Tensor& uses_index, int64_t num_samples) {
  const char* op = "torchrec_esd::group_slice_expected: ";
  check_vec(samples, at::kLong, "samples");
  check_vec(workers, at::kLong, "workers");
  check_vec(pair_ptr, at::kLong, "pair_ptr");
  check_vec(occ_k, at::kLong, "occ_k");
  check_vec(hit_ptr, at::kLong, "hit_ptr");
  check_vec(hit_key, at::kLong, "hit_key");
  check_vec(hit_outdated, at::kBool, "hit_outdated");
  check_vec(table_of, at::kLong, "table_of");
  check_vec(uses, at::kDouble, "uses");
  check_vec(owner, at::kLong, "owner");
  check_vec(owner_push, at::kDouble, "owner_push");
  check_vec(shares, at::kDouble, "shares");
  check_vec(uses_index, at::kLong, "uses_index");
  const int64_t Bg = samples.numel(), nw = workers.numel(), U = table_of.numel(), W = shares.numel();
  const int64_t B = pair_ptr.numel() - 1, H = hit_key.numel();
  TORCH_CHECK(B >= 0 && B == num_samples, op, "pair_ptr must have num_samples + 1 = ", num_samples + 1,
              " entries, got ", pair_ptr.numel());
  TORCH_CHECK(hit_ptr.numel() == W + 1 && hit_outdated.numel() == H, op,
              "hit_ptr must have W + 1 entries and hit_outdated one per hit");
  TORCH_CHECK(uses.numel() == U && owner.numel() == U && owner_push.numel() == U && uses_index.numel() == U, op,
              "uses, owner, owner_push and uses_index must have one entry per key (", U, ")");
  for (const at::Tensor* t : {&row_time, &evict_time})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(0) == W &&
                    t->is_contiguous() && t->size(1) == row_time.size(1),
                op, "row_time and evict_time must be contiguous float64 CPU [W, T] matrices, W = ", W);
  TORCH_CHECK(p_shared.device().is_cpu() && p_shared.scalar_type() == at::kDouble && p_shared.dim() == 2 &&
                  p_shared.size(1) == nw && p_shared.is_contiguous(),
              op, "p_shared must be a contiguous float64 CPU [distinct uses, |workers|] matrix");
  const int64_t T = row_time.size(1), ND = p_shared.size(0);
  const int64_t* sp = samples.data_ptr<int64_t>();
  const int64_t* gw = workers.data_ptr<int64_t>();
  const int64_t* pp = pair_ptr.data_ptr<int64_t>();
  const int64_t* ok = occ_k.data_ptr<int64_t>();
  const int64_t P = occ_k.numel();
  for (int64_t j = 0; j < nw; ++j)
    TORCH_CHECK(gw[j] >= 0 && gw[j] < W, op, "worker ", gw[j], " outside [0, ", W, ")");
  // the group's distinct keys, in order of first use, and their local index
  std::vector<int64_t> local(static_cast<size_t>(U), -1), ku;
  for (int64_t i = 0; i < Bg; ++i) {
    const int64_t s = sp[i];
    TORCH_CHECK(s >= 0 && s < B && (i == 0 || s > sp[i - 1]), op, "samples must be ascending in [0, ", B, ")");
    TORCH_CHECK(pp[s] >= 0 && pp[s] <= pp[s + 1] && pp[s + 1] <= P, op, "pair_ptr is not a valid offset array");
    for (int64_t p = pp[s]; p < pp[s + 1]; ++p) {
      const int64_t x = ok[p];
      TORCH_CHECK(x >= 0 && x < U, op, "pair ", p, " names key ", x, " outside [0, ", U, ")");
      if (local[x] < 0) {
        local[x] = static_cast<int64_t>(ku.size());
        ku.push_back(x);
      }
    }
  }
  const int64_t nu = static_cast<int64_t>(ku.size());
  // cached | outdated << 1 per (local key, column), from the group's workers' hits
  std::vector<uint8_t> code(static_cast<size_t>(nu * nw), 0);
  const int64_t* hp = hit_ptr.data_ptr<int64_t>();
  const int64_t* hk = hit_key.data_ptr<int64_t>();
  const bool* hod = hit_outdated.data_ptr<bool>();
  for (int64_t j = 0; j < nw; ++j) {
    const int64_t w = gw[j];
    TORCH_CHECK(hp[w] >= 0 && hp[w] <= hp[w + 1] && hp[w + 1] <= H, op, "hit_ptr is not a valid offset array");
    for (int64_t i = hp[w]; i < hp[w + 1]; ++i) {
      TORCH_CHECK(hk[i] >= 0 && hk[i] < U, op, "hit ", i, " names key ", hk[i], " outside [0, ", U, ")");
      const int64_t l = local[hk[i]];
      if (l >= 0) code[l * nw + j] = static_cast<uint8_t>(1 | (hod[i] ? 2 : 0));
    }
  }
  const int64_t* tab = table_of.data_ptr<int64_t>();
  const double* rtp = row_time.data_ptr<double>();
  const double* evp = evict_time.data_ptr<double>();
  const double* us = uses.data_ptr<double>();
  const int64_t* own_w = owner.data_ptr<int64_t>();
  const double* opush = owner_push.data_ptr<double>();
  const double* sh = shares.data_ptr<double>();
  const double* ps = p_shared.data_ptr<double>();
  const int64_t* ui = uses_index.data_ptr<int64_t>();
  const double den = static_cast<double>(std::max<int64_t>(1, num_samples - 1));
  std::vector<double> shm(nw);
  for (int64_t j = 0; j < nw; ++j) shm[j] = std::max(sh[gw[j]] - 1.0, 0.0);
  std::vector<double> h(static_cast<size_t>(nu * nw));
  for (int64_t l = 0; l < nu; ++l) {
    const int64_t x = ku[l], t = tab[x];
    TORCH_CHECK(t >= 0 && t < T && ui[x] >= 0 && ui[x] < ND, op, "key ", x, " has table ", t, " / uses index ",
                ui[x], " out of range");
    const double n = us[x];
    const double* prow = ps + ui[x] * nw;
    const int64_t o = own_w[x];
    const double share = o >= 0 ? opush[x] / std::max(n, 1.0) : 0.0;
    for (int64_t j = 0; j < nw; ++j) {
      const int64_t w = gw[j];
      const uint8_t c = code[l * nw + j];
      const double rt = rtp[w * T + t];
      const double own = (c & 1) ? ((c & 2) ? 1.0 : 0.0) * rt : rt + evp[w * T + t];
      const double m = 1.0 + (n - 1.0) * shm[j] / den;
      const double p = prow[j];
      double v = (own + p * rt) / m;
      if (o >= 0) v = v + (o == w ? share * p : share);
      h[l * nw + j] = v;
    }
  }
  auto out = at::zeros({Bg, nw}, row_time.options());
  double* op_ = out.data_ptr<double>();
  for (int64_t i = 0; i < Bg; ++i) {
    const int64_t s = sp[i];
    double* dst = op_ + i * nw;
    for (int64_t p = pp[s]; p < pp[s + 1]; ++p) {
      const double* src = h.data() + local[ok[p]] * nw;
      for (int64_t j = 0; j < nw; ++j) dst[j] += src[j];
    }
  }
  return out;
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("group_slice_expected", &group_slice_expected_cpu); }

}  // namespace torchrec_esd
