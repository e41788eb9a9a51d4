// CPU kernel of dedup_inputs: the arrays of one batch's de-duplicated cost model
// (torchrec_esd.cost.DedupCost) and its additive [B, W] matrix in one call, from
// the batch read against the caches (torchrec_esd.cost.batch.read_batch).  The
// PyTorch / numpy path of CostModel.dedup_cost and DedupCost.additive_matrix is
// the reference the tests compare it to, bit for bit.
//
// Why one call: the esd dispatcher decides in a background thread of worker 0
// while the training thread runs Python.  Every operator call releases the GIL
// and waits for it again, so the dozen tensor and numpy steps of the Python path
// took 12-19 ms per decision in the end-to-end run instead of ~5 ms alone.
//
//   occ_s, occ_k   the distinct (sample, row) pairs, sorted by (sample, row index)
//   pull[u, w]     0 if w holds row u fresh, rt[w, u] if outdated, else
//                  rt[w, u] + evict_time[w, table_of[u]] (miss pull + expected miss push)
//   push[u, w]     rt[w, u] = row_time[w, table_of[u]]
//   owner[u]       the first worker holding u dirty, -1 if none
//   owner_push[u]  rt[owner[u], u] (0 without owner)
//   additive[s, w] sum over the sample's distinct rows of h[u, w], h = pull plus
//                  the owner's push on every other worker (owner column:
//                  (pull + owner_push) - owner_push, as the numpy path computes it),
//                  summed in the pairs' order as numpy's add.reduceat does: the first
//                  row plus the pairwise sum of the others (numpy_sum.h)
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>
#include <vector>

#include "numpy_sum.h"

namespace torchrec_esd {

at::Tensor id_table_lookup_cpu(const at::Tensor& slots, const at::Tensor& queries);
std::tuple<at::Tensor, at::Tensor, at::Tensor> unique_keys_per_group_cpu(
    const at::Tensor& keys, const at::Tensor& group, int64_t num_groups);

namespace {

void check_wu(const char* op, const char* name, const at::Tensor& t, int64_t w, int64_t u) {
  TORCH_CHECK(t.scalar_type() == at::kBool && t.dim() == 2 && t.size(0) == w && t.size(1) == u,
              "torchrec_esd::", op, ": ", name, " must be a bool [", w, ", ", u, "] tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dedup_inputs_cpu(const at::Tensor& keys, const at::Tensor& offsets, const at::Tensor& slots,
                 const at::Tensor& table_of, const at::Tensor& cached, const at::Tensor& outdated,
                 const at::Tensor& dirty, const at::Tensor& row_time, const at::Tensor& evict_time) {
  const char* op = "dedup_inputs";
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 1, "torchrec_esd::", op,
              ": keys must be an int64 vector, got ", keys.scalar_type(), " ", keys.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1,
              "torchrec_esd::", op, ": offsets must be a non-empty int64 vector, got ",
              offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(table_of.scalar_type() == at::kLong && table_of.dim() == 1, "torchrec_esd::", op,
              ": table_of must be an int64 vector, got ", table_of.scalar_type(), " ", table_of.sizes());
  TORCH_CHECK(row_time.scalar_type() == at::kDouble && row_time.dim() == 2 &&
                  evict_time.scalar_type() == at::kDouble && evict_time.sizes() == row_time.sizes(),
              "torchrec_esd::", op, ": row_time and evict_time must be float64 [W, T] tensors of one "
              "shape, got ", row_time.sizes(), " and ", evict_time.sizes());
  const int64_t W = row_time.size(0), T = row_time.size(1), U = table_of.numel();
  const int64_t N = keys.numel(), B = offsets.numel() - 1;
  check_wu(op, "cached", cached, W, U);
  check_wu(op, "outdated", outdated, W, U);
  check_wu(op, "dirty", dirty, W, U);
  const at::Tensor off = offsets.contiguous();
  const int64_t* po = off.data_ptr<int64_t>();
  TORCH_CHECK(po[0] == 0 && po[B] == N, "torchrec_esd::", op, ": offsets must run from 0 to the ",
              N, " keys, got ", po[0], " .. ", po[B]);
  for (int64_t s = 0; s < B; ++s) {
    TORCH_CHECK(po[s] <= po[s + 1], "torchrec_esd::", op, ": offsets must not decrease (sample ", s, ")");
  }
  const at::Tensor tof = table_of.contiguous();
  const int64_t* pt = tof.data_ptr<int64_t>();
  for (int64_t u = 0; u < U; ++u) {
    TORCH_CHECK(pt[u] >= 0 && pt[u] < T, "torchrec_esd::", op, ": table_of[", u, "] = ", pt[u],
                " is not a table in [0, ", T, ")");
  }

  // the distinct (sample, row) pairs: the rows' indices in the batch's distinct keys
  at::Tensor occ_s, occ_k;
  if (N == 0) {
    occ_s = at::empty({0}, at::kLong);
    occ_k = at::empty({0}, at::kLong);
  } else {
    at::Tensor kidx = id_table_lookup_cpu(slots, keys);
    at::Tensor sample = at::empty({N}, at::kLong);
    int64_t* ps = sample.data_ptr<int64_t>();
    for (int64_t s = 0; s < B; ++s) {
      for (int64_t i = po[s]; i < po[s + 1]; ++i) ps[i] = s;
    }
    TORCH_CHECK(kidx.numel() == 0 || kidx.min().item<int64_t>() >= 0, "torchrec_esd::", op,
                ": a key of the batch is not in its id table");
    auto pairs = unique_keys_per_group_cpu(kidx, sample, B);
    occ_k = std::get<0>(pairs).to(at::kLong);
    occ_s = std::get<1>(pairs);
    TORCH_CHECK(occ_k.numel() == 0 || occ_k.max().item<int64_t>() < U, "torchrec_esd::", op,
                ": the id table names a row outside the ", U, " distinct keys");
  }

  const at::Tensor rtc = row_time.contiguous(), evc = evict_time.contiguous();
  const double* rt = rtc.data_ptr<double>();
  const double* ev = evc.data_ptr<double>();
  const at::Tensor cc = cached.contiguous(), oc = outdated.contiguous(), dc = dirty.contiguous();
  const bool* pc = cc.data_ptr<bool>();
  const bool* pod = oc.data_ptr<bool>();
  const bool* pd = dc.data_ptr<bool>();

  at::Tensor pull = at::empty({U, W}, at::kDouble), push = at::empty({U, W}, at::kDouble);
  at::Tensor owner = at::empty({U}, at::kLong), owner_push = at::empty({U}, at::kDouble);
  double* pp = pull.data_ptr<double>();
  double* ph = push.data_ptr<double>();
  int64_t* pw = owner.data_ptr<int64_t>();
  double* pop = owner_push.data_ptr<double>();
  for (int64_t u = 0; u < U; ++u) {
    const int64_t t = pt[u];
    int64_t own = -1;
    for (int64_t w = 0; w < W; ++w) {
      const double r = rt[w * T + t];
      const int64_t wu = w * U + u;
      ph[u * W + w] = r;
      // torch.where(cached, outdated.double() * rt, rt + evict)
      pp[u * W + w] = pc[wu] ? (pod[wu] ? 1.0 : 0.0) * r : r + ev[w * T + t];
      if (own < 0 && pd[wu]) own = w;
    }
    pw[u] = own;
    pop[u] = own >= 0 ? ph[u * W + own] : 0.0;
  }

  // additive: h rows (pull with the owner's push elsewhere), summed per sample in pair order
  at::Tensor additive = at::zeros({B, W}, at::kDouble);
  const int64_t P = occ_k.numel();
  if (P > 0) {
    std::vector<double> h(static_cast<size_t>(U * W));
    for (int64_t u = 0; u < U; ++u) {
      const double op_u = pop[u];
      for (int64_t w = 0; w < W; ++w) {
        double v = pp[u * W + w];
        if (pw[u] >= 0) {
          v = v + op_u;
          if (w == pw[u]) v = v - op_u;
        }
        h[u * W + w] = v;
      }
    }
    const int64_t* pk = occ_k.data_ptr<int64_t>();
    const int64_t* pss = occ_s.data_ptr<int64_t>();
    double* pa = additive.data_ptr<double>();
    std::vector<double> rest;
    int64_t i = 0;
    while (i < P) {
      const int64_t s = pss[i];
      int64_t j = i + 1;
      while (j < P && pss[j] == s) ++j;
      // np.add.reduceat along the rows: the first row plus numpy's pairwise sum of the others
      double* out = pa + s * W;
      rest.resize(static_cast<size_t>(j - i - 1));
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t k = i + 1; k < j; ++k) rest[k - i - 1] = h[pk[k] * W + w];
        out[w] = h[pk[i] * W + w] + pairwise_sum(rest.data(), j - i - 1);
      }
      i = j;
    }
  }
  return {occ_s, occ_k, pull, push, owner, owner_push, additive};
}

}  // namespace

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("dedup_inputs", &dedup_inputs_cpu); }

}  // namespace torchrec_esd
