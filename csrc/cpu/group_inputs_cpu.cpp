// CPU kernels of the grouped dispatcher's inputs (torchrec_esd/cost/group_inputs.py, their
// references), each equal bit for bit to the reference (tests/test_dispatch_kernels.py):
//
// group_price: GroupInputs.group_matrix, the [B, G] stage-1 price: O(H + U G + P G) for H
//   cached (worker, key) pairs, U distinct keys and P distinct (sample, key) pairs.
//
// sample_key_pairs: GroupInputs' distinct (sample, key) pairs, sorted by (sample, key), their
//   per-sample offsets and every key's use count: O(N log L) for N keys, L the longest sample.
//
// bucket_order: the stable order of values in [0, num_bins) by value (a counting sort, O(n +
//   num_bins)) and the bins' offsets: the hits in worker order.
//
// group_slice_expected: GroupInputs.sub_matrix(samples, workers, "expected"), one group's
// [B_g, |g|] slice of the expected cost matrix.  Per key x of the group's samples and worker w of the group (column j):
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

// op: "torchrec_esd::<name>: ", the message's prefix
void check_vec(const char* op, const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dt && t.dim() == 1 && t.is_contiguous(), op, name,
              " must be a contiguous 1-D CPU ", c10::toString(dt), " tensor");
}

}  // namespace

at::Tensor group_price_cpu(const at::Tensor& hit_key, const at::Tensor& hit_group, const at::Tensor& hit_outdated,
                           const at::Tensor& table_of, const at::Tensor& row_time, const at::Tensor& evict_time,
                           const at::Tensor& uses, const at::Tensor& per, int64_t num_samples,
                           const at::Tensor& occ_s, const at::Tensor& occ_k) {
  const char* op = "torchrec_esd::group_price: ";
  check_vec(op, hit_key, at::kLong, "hit_key");
  check_vec(op, hit_group, at::kLong, "hit_group");
  check_vec(op, hit_outdated, at::kBool, "hit_outdated");
  check_vec(op, table_of, at::kLong, "table_of");
  check_vec(op, uses, at::kDouble, "uses");
  check_vec(op, per, at::kDouble, "per");
  check_vec(op, occ_s, at::kLong, "occ_s");
  check_vec(op, occ_k, at::kLong, "occ_k");
  const int64_t H = hit_key.numel(), U = table_of.numel(), G = per.numel(), P = occ_s.numel();
  TORCH_CHECK(hit_group.numel() == H && hit_outdated.numel() == H, op, "hit_key, hit_group and hit_outdated",
              " must have the same length");
  TORCH_CHECK(uses.numel() == U, op, "uses must have one entry per key (", U, "), got ", uses.numel());
  TORCH_CHECK(occ_k.numel() == P, op, "occ_s and occ_k must have the same length");
  TORCH_CHECK(num_samples >= 0, op, "num_samples must be >= 0");
  for (const at::Tensor* t : {&row_time, &evict_time})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kDouble && t->dim() == 2 && t->size(1) == G &&
                    t->is_contiguous(),
                op, "row_time and evict_time must be contiguous float64 CPU [T, G] matrices, G = ", G);
  TORCH_CHECK(evict_time.size(0) == row_time.size(0), op, "row_time and evict_time must have the same tables");
  const int64_t T = row_time.size(0);
  const int64_t* hk = hit_key.data_ptr<int64_t>();
  const int64_t* hg = hit_group.data_ptr<int64_t>();
  const bool* hod = hit_outdated.data_ptr<bool>();
  // 1: held (outdated), 2: held fresh
  std::vector<uint8_t> state(static_cast<size_t>(U * G), 0);
  for (int64_t i = 0; i < H; ++i) {
    const int64_t g = hg[i];
    if (g < 0) continue;
    TORCH_CHECK(g < G && hk[i] >= 0 && hk[i] < U, op, "hit ", i, " names key ", hk[i], " / group ", g,
                " outside [0, ", U, ") x [0, ", G, ")");
    uint8_t& s = state[hk[i] * G + g];
    s = std::max<uint8_t>(s, hod[i] ? 1 : 2);
  }
  const int64_t* tab = table_of.data_ptr<int64_t>();
  const double* rt = row_time.data_ptr<double>();
  const double* ev = evict_time.data_ptr<double>();
  const double* us = uses.data_ptr<double>();
  const double* pg = per.data_ptr<double>();
  const double den = static_cast<double>(std::max<int64_t>(1, num_samples - 1));
  auto key_cost = [&](int64_t k, double* dst) {
    const int64_t t = tab[k];
    TORCH_CHECK(t >= 0 && t < T, op, "key ", k, " has table ", t, " outside [0, ", T, ")");
    for (int64_t g = 0; g < G; ++g) {
      const uint8_t s = state[k * G + g];
      const double r = rt[t * G + g];
      const double c = s == 2 ? 0.0 : (s == 1 ? r : r + ev[t * G + g]);
      // a key used once: (0 * per) / den = 0, and c / 1.0 == c: no division
      dst[g] = us[k] == 1.0 ? c : c / (1.0 + ((us[k] - 1.0) * pg[g]) / den);
    }
  };
  auto out = at::zeros({num_samples, G}, row_time.options());
  double* o = out.data_ptr<double>();
  const int64_t* os = occ_s.data_ptr<int64_t>();
  const int64_t* ok = occ_k.data_ptr<int64_t>();
  // every sample sums its keys' rows in pair order; when the pairs are sorted by (sample, key)
  // (GroupInputs' are) that is ascending key order, so the keys can be visited in ascending
  // order, each row computed once and added to its users (no [U, G] array, no random row reads)
  bool key_major = true;
  std::vector<int64_t> cnt(static_cast<size_t>(U) + 1, 0);
  for (int64_t i = 0; i < P; ++i) {
    TORCH_CHECK(os[i] >= 0 && os[i] < num_samples && ok[i] >= 0 && ok[i] < U, op, "pair ", i, " (", os[i], ", ",
                ok[i], ") outside [0, ", num_samples, ") x [0, ", U, ")");
    if (i > 0 && (os[i] < os[i - 1] || (os[i] == os[i - 1] && ok[i] <= ok[i - 1]))) key_major = false;
    ++cnt[ok[i] + 1];
  }
  if (key_major) {
    for (int64_t k = 0; k < U; ++k) cnt[k + 1] += cnt[k];
    std::vector<int64_t> users(static_cast<size_t>(P)), fill(cnt.begin(), cnt.end() - 1);
    for (int64_t i = 0; i < P; ++i) users[fill[ok[i]]++] = os[i];
    std::vector<double> row(static_cast<size_t>(G));
    for (int64_t k = 0; k < U; ++k) {
      if (cnt[k] == cnt[k + 1]) continue;
      key_cost(k, row.data());
      for (int64_t q = cnt[k]; q < cnt[k + 1]; ++q) {
        if (q + 8 < P) {  // the output rows are read at random: fetch a few users ahead
          __builtin_prefetch(o + users[q + 8] * G, 1);
          __builtin_prefetch(o + users[q + 8] * G + G - 1, 1);
        }
        double* dst = o + users[q] * G;
        for (int64_t g = 0; g < G; ++g) dst[g] += row[g];
      }
    }
    return out;
  }
  std::vector<double> cost(static_cast<size_t>(U * G));
  for (int64_t k = 0; k < U; ++k) key_cost(k, cost.data() + k * G);
  for (int64_t i = 0; i < P; ++i) {
    double* dst = o + os[i] * G;
    const double* src = cost.data() + ok[i] * G;
    for (int64_t g = 0; g < G; ++g) dst[g] += src[g];
  }
  return out;
}

at::Tensor group_slice_expected_cpu(const at::Tensor& samples, const at::Tensor& workers, const at::Tensor& pair_ptr,
                                    const at::Tensor& occ_k, const at::Tensor& hit_ptr, const at::Tensor& hit_key,
                                    const at::Tensor& hit_outdated, const at::Tensor& table_of,
                                    const at::Tensor& row_time, const at::Tensor& evict_time, const at::Tensor& uses,
                                    const at::Tensor& owner, const at::Tensor& owner_push, const at::Tensor& shares,
                                    const at::Tensor& p_shared, const at::Tensor& uses_index, int64_t num_samples) {
  const char* op = "torchrec_esd::group_slice_expected: ";
  check_vec(op, samples, at::kLong, "samples");
  check_vec(op, workers, at::kLong, "workers");
  check_vec(op, pair_ptr, at::kLong, "pair_ptr");
  check_vec(op, occ_k, at::kLong, "occ_k");
  check_vec(op, hit_ptr, at::kLong, "hit_ptr");
  check_vec(op, hit_key, at::kLong, "hit_key");
  check_vec(op, hit_outdated, at::kBool, "hit_outdated");
  check_vec(op, table_of, at::kLong, "table_of");
  check_vec(op, uses, at::kDouble, "uses");
  check_vec(op, owner, at::kLong, "owner");
  check_vec(op, owner_push, at::kDouble, "owner_push");
  check_vec(op, shares, at::kDouble, "shares");
  check_vec(op, uses_index, at::kLong, "uses_index");
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
  // m depends on the key only through its use count: one row per distinct count (m_tab[u, j],
  // computed lazily, the same expression), and m = 1 exactly for a key used once
  std::vector<double> m_tab(static_cast<size_t>(ND * nw), 0.0);
  std::vector<uint8_t> m_done(static_cast<size_t>(ND), 0);
  std::vector<double> h(static_cast<size_t>(nu * nw));
  for (int64_t l = 0; l < nu; ++l) {
    const int64_t x = ku[l], t = tab[x];
    TORCH_CHECK(t >= 0 && t < T && ui[x] >= 0 && ui[x] < ND, op, "key ", x, " has table ", t, " / uses index ",
                ui[x], " out of range");
    const double n = us[x];
    const double* prow = ps + ui[x] * nw;
    const bool once = n == 1.0;
    const double* mrow = m_tab.data() + ui[x] * nw;
    if (!once && !m_done[ui[x]]) {
      for (int64_t j = 0; j < nw; ++j) m_tab[ui[x] * nw + j] = 1.0 + (n - 1.0) * shm[j] / den;
      m_done[ui[x]] = 1;
    }
    const int64_t o = own_w[x];
    const double share = o >= 0 ? opush[x] / std::max(n, 1.0) : 0.0;
    for (int64_t j = 0; j < nw; ++j) {
      const int64_t w = gw[j];
      const uint8_t c = code[l * nw + j];
      const double rt = rtp[w * T + t];
      const double own = (c & 1) ? ((c & 2) ? 1.0 : 0.0) * rt : rt + evp[w * T + t];
      const double p = prow[j];
      // (x / 1.0 == x: a key used once skips the division)
      double v = once ? own + p * rt : (own + p * rt) / mrow[j];
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sample_key_pairs_cpu(const at::Tensor& offsets,
                                                                                const at::Tensor& kidx,
                                                                                int64_t num_keys) {
  const char* op = "torchrec_esd::sample_key_pairs: ";
  check_vec(op, offsets, at::kLong, "offsets");
  check_vec(op, kidx, at::kLong, "kidx");
  TORCH_CHECK(offsets.numel() >= 1, op, "offsets must have num_samples + 1 >= 1 entries");
  TORCH_CHECK(num_keys >= 0, op, "num_keys must be >= 0");
  const int64_t B = offsets.numel() - 1, N = kidx.numel();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* ki = kidx.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[B] == N, op, "offsets must run from 0 to len(kidx) = ", N);
  auto lopts = offsets.options();
  auto ptr = at::empty({B + 1}, lopts);
  auto uses = at::zeros({num_keys}, lopts.dtype(at::kDouble));
  int64_t* pp = ptr.data_ptr<int64_t>();
  double* us = uses.data_ptr<double>();
  std::vector<int64_t> occ_s, occ_k, seg;
  occ_s.reserve(N);
  occ_k.reserve(N);
  pp[0] = 0;
  for (int64_t s = 0; s < B; ++s) {
    TORCH_CHECK(off[s] <= off[s + 1], op, "offsets must be non-decreasing");
    seg.assign(ki + off[s], ki + off[s + 1]);
    std::sort(seg.begin(), seg.end());
    for (size_t i = 0; i < seg.size(); ++i) {
      if (i > 0 && seg[i] == seg[i - 1]) continue;
      TORCH_CHECK(seg[i] >= 0 && seg[i] < num_keys, op, "key index ", seg[i], " outside [0, ", num_keys, ")");
      occ_s.push_back(s);
      occ_k.push_back(seg[i]);
      us[seg[i]] += 1.0;
    }
    pp[s + 1] = static_cast<int64_t>(occ_k.size());
  }
  const int64_t P = static_cast<int64_t>(occ_k.size());
  auto os = at::empty({P}, lopts), ok = at::empty({P}, lopts);
  std::copy(occ_s.begin(), occ_s.end(), os.data_ptr<int64_t>());
  std::copy(occ_k.begin(), occ_k.end(), ok.data_ptr<int64_t>());
  return {os, ok, ptr, uses};
}

std::tuple<at::Tensor, at::Tensor> bucket_order_cpu(const at::Tensor& bins, int64_t num_bins) {
  const char* op = "torchrec_esd::bucket_order: ";
  check_vec(op, bins, at::kLong, "bins");
  TORCH_CHECK(num_bins >= 0, op, "num_bins must be >= 0");
  const int64_t n = bins.numel();
  const int64_t* b = bins.data_ptr<int64_t>();
  auto ptr = at::zeros({num_bins + 1}, bins.options());
  auto order = at::empty({n}, bins.options());
  int64_t* pp = ptr.data_ptr<int64_t>();
  int64_t* o = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(b[i] >= 0 && b[i] < num_bins, op, "bin ", b[i], " outside [0, ", num_bins, ")");
    ++pp[b[i] + 1];
  }
  for (int64_t k = 0; k < num_bins; ++k) pp[k + 1] += pp[k];
  std::vector<int64_t> fill(pp, pp + num_bins);
  for (int64_t i = 0; i < n; ++i) o[fill[b[i]]++] = i;
  return {order, ptr};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("group_price", &group_price_cpu);
  m.impl("group_slice_expected", &group_slice_expected_cpu);
  m.impl("sample_key_pairs", &sample_key_pairs_cpu);
  m.impl("bucket_order", &bucket_order_cpu);
}

}  // namespace torchrec_esd
