// CPU kernel of dedup_inputs: the arrays of one batch's de-duplicated cost model
// (torchrec_esd.cost.DedupCost) and its additive [B, W] matrix in one call, from
// the batch read against the caches (torchrec_esd.cost.batch.read_batch: the
// cached (worker, key) pairs of its distinct keys, CacheLookup.hits) and the
// caches' occupancy.  The
// PyTorch / numpy path of CostModel.dedup_cost and DedupCost.additive_matrix is
// the reference the tests compare it to, bit for bit.
//
// Why one call: the esd dispatcher decides in a background thread of worker 0
// while the training thread runs Python.  Every operator call releases the GIL
// and waits for it again, so the dozen tensor and numpy steps of the Python path
// took 12-19 ms per decision in the end-to-end run instead of ~5 ms alone.
//
//   occ_s, occ_k   the distinct (sample, row) pairs, sorted by (sample, row index)
//   pull[u, w]     0 if w holds row u fresh, rt[w, u] if outdated, else rt[w, u] plus
//                  the expected miss push: rt[w, u] times the dirty fraction of w's
//                  cache of that table where it is full (CostModel._evict_fraction)
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

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <utility>
#include <vector>

#include "numpy_sum.h"

namespace torchrec_esd {

at::Tensor id_table_lookup_cpu(const at::Tensor& slots, const at::Tensor& queries);
std::tuple<at::Tensor, at::Tensor, at::Tensor> unique_keys_per_group_cpu(
    const at::Tensor& keys, const at::Tensor& group, int64_t num_groups);

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
dedup_inputs_cpu(const at::Tensor& keys, const at::Tensor& offsets, const at::Tensor& slots,
                 const at::Tensor& table_of, const at::Tensor& hit_worker, const at::Tensor& hit_key,
                 const at::Tensor& hit_outdated, const at::Tensor& hit_dirty, const at::Tensor& occupied,
                 const at::Tensor& ndirty, const at::Tensor& capacity, const at::Tensor& row_time) {
  const char* op = "dedup_inputs";
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 1, "torchrec_esd::", op,
              ": keys must be an int64 vector, got ", keys.scalar_type(), " ", keys.sizes());
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.numel() >= 1,
              "torchrec_esd::", op, ": offsets must be a non-empty int64 vector, got ",
              offsets.scalar_type(), " ", offsets.sizes());
  TORCH_CHECK(table_of.scalar_type() == at::kLong && table_of.dim() == 1, "torchrec_esd::", op,
              ": table_of must be an int64 vector, got ", table_of.scalar_type(), " ", table_of.sizes());
  TORCH_CHECK(row_time.scalar_type() == at::kDouble && row_time.dim() == 2, "torchrec_esd::", op,
              ": row_time must be a float64 [W, T] tensor, got ", row_time.scalar_type(), " ",
              row_time.sizes());
  const int64_t W = row_time.size(0), T = row_time.size(1), U = table_of.numel();
  const int64_t N = keys.numel(), B = offsets.numel() - 1;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"occupied", &occupied},
                                {"ndirty", &ndirty}, {"capacity", &capacity}}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->size(0) == W && t->size(1) == T,
                "torchrec_esd::", op, ": ", name, " must be an int64 [", W, ", ", T, "] tensor, got ",
                t->scalar_type(), " ", t->sizes());
  }
  const int64_t H = hit_worker.numel();
  TORCH_CHECK(hit_worker.scalar_type() == at::kLong && hit_key.scalar_type() == at::kLong &&
                  hit_outdated.scalar_type() == at::kBool && hit_dirty.scalar_type() == at::kBool &&
                  hit_worker.dim() == 1 && hit_key.dim() == 1 && hit_outdated.dim() == 1 &&
                  hit_dirty.dim() == 1 && hit_key.numel() == H && hit_outdated.numel() == H &&
                  hit_dirty.numel() == H,
              "torchrec_esd::", op, ": the hits must be int64 worker and key and bool outdated and "
              "dirty vectors of one length, got ", hit_worker.sizes(), " ", hit_key.sizes(), " ",
              hit_outdated.sizes(), " ", hit_dirty.sizes());
  // every worker's state of the distinct keys from the cached (worker, key) pairs
  std::vector<uint8_t> cached(static_cast<size_t>(W * U), 0), outdated(cached.size(), 0),
      dirty(cached.size(), 0);
  {
    const at::Tensor hw = hit_worker.contiguous(), hk = hit_key.contiguous();
    const at::Tensor ho = hit_outdated.contiguous(), hd = hit_dirty.contiguous();
    const int64_t* pw = hw.data_ptr<int64_t>();
    const int64_t* pk = hk.data_ptr<int64_t>();
    const bool* pho = ho.data_ptr<bool>();
    const bool* phd = hd.data_ptr<bool>();
    for (int64_t i = 0; i < H; ++i) {
      TORCH_CHECK(pw[i] >= 0 && pw[i] < W && pk[i] >= 0 && pk[i] < U, "torchrec_esd::", op,
                  ": hit ", i, " names worker ", pw[i], ", key ", pk[i], " outside [0, ", W,
                  ") x [0, ", U, ")");
      const int64_t wu = pw[i] * U + pk[i];
      cached[wu] = 1;
      outdated[wu] = pho[i];
      dirty[wu] = phd[i];
    }
  }
  const at::Tensor rtc = row_time.contiguous();
  const double* rt = rtc.data_ptr<double>();
  // seconds of a miss's expected eviction push: the dirty fraction of a full cache
  // (CostModel._evict_fraction) times the row's time
  std::vector<double> ev(static_cast<size_t>(W * T));
  {
    const at::Tensor occ = occupied.contiguous(), nd = ndirty.contiguous(), cap = capacity.contiguous();
    const int64_t* po_ = occ.data_ptr<int64_t>();
    const int64_t* pn = nd.data_ptr<int64_t>();
    const int64_t* pc_ = cap.data_ptr<int64_t>();
    for (int64_t i = 0; i < W * T; ++i) {
      const bool full = po_[i] > 0 && po_[i] >= pc_[i];
      const double frac =
          static_cast<double>(pn[i]) / static_cast<double>(std::max<int64_t>(po_[i], 1));
      ev[i] = (full ? frac : 0.0) * rt[i];
    }
  }
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

  const uint8_t* pc = cached.data();
  const uint8_t* pod = outdated.data();
  const uint8_t* pd = dirty.data();

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
      pp[u * W + w] = pc[wu] ? (pod[wu] ? 1.0 : 0.0) * r : r + ev[static_cast<size_t>(w * T + t)];
      if (own < 0 && pc[wu] && pd[wu]) own = w;
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
