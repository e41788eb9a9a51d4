// CPU kernels of the holder index (torchrec_esd/cache/holders.py): row key ->
// every cache slot, over all workers, that holds it.
//
// A cache slot is named by its *global slot* g (worker w's slot s is
// base[w] + s).  State, all int64:
//   head  [cap, 2]  id table (table_common.h) key -> the first global slot of
//                   the key's holder list;
//   next, prev [n]  a doubly linked list per key through the global slots
//                   (-1: none);
//   gkey  [n]       the key the index records at every global slot (-1 empty).
// holder_index_sync makes slots [base, base + len(slot_keys)) record
// slot_keys: O(len) compares plus O(1) expected per changed slot (unlink the
// old key, link the new one at its list's head).  holder_index_lookup walks
// the lists of the query keys: O(len(queries) + hits).  holder_index_read is the lookup plus
// every hit's worker (by buckets of slots, HolderIndex.slot_workers) and its slot's outdated /
// dirty flags, in one pass that prefetches the per-slot state.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "../table_common.h"

namespace torchrec_esd {

namespace {

void check_long_vec(const char* op, const char* name, const at::Tensor& t, int64_t n = -1) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kLong && t.dim() == 1 && t.is_contiguous(),
              "torchrec_esd::", op, ": ", name, " must be a contiguous 1-D CPU int64 tensor");
  TORCH_CHECK(n < 0 || t.numel() == n, "torchrec_esd::", op, ": ", name, " must have ", n,
              " entries, got ", t.numel());
}

void check_head(const char* op, const at::Tensor& head) {
  TORCH_CHECK(head.device().is_cpu() && head.scalar_type() == at::kLong && head.dim() == 2 &&
                  head.size(1) == 2 && head.is_contiguous() && head.size(0) >= 2 &&
                  (head.size(0) & (head.size(0) - 1)) == 0,
              "torchrec_esd::", op, ": head must be a contiguous CPU int64 [cap, 2], cap a power of two");
}

}  // namespace

void holder_index_sync_cpu(at::Tensor head, at::Tensor next, at::Tensor prev, at::Tensor gkey, int64_t base,
                           const at::Tensor& slot_keys) {
  const char* op = "holder_index_sync";
  check_head(op, head);
  const int64_t n = gkey.numel();
  check_long_vec(op, "gkey", gkey);
  check_long_vec(op, "next", next, n);
  check_long_vec(op, "prev", prev, n);
  check_long_vec(op, "slot_keys", slot_keys);
  const int64_t S = slot_keys.numel();
  TORCH_CHECK(base >= 0 && base + S <= n, "torchrec_esd::", op, ": slots [", base, ", ", base + S,
              ") outside the index's ", n, " global slots");
  int64_t* tab = head.data_ptr<int64_t>();
  const uint64_t mask = static_cast<uint64_t>(head.size(0) - 1);
  int64_t* nx = next.data_ptr<int64_t>();
  int64_t* pv = prev.data_ptr<int64_t>();
  int64_t* gk = gkey.data_ptr<int64_t>();
  const int64_t* sk = slot_keys.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t g = base + s;
    const int64_t k = sk[s] < 0 ? -1 : sk[s];
    const int64_t old = gk[g];
    if (old == k) continue;
    if (old >= 0) {  // unlink g from old's list
      const int64_t p = pv[g], q = nx[g];
      if (p >= 0) {
        nx[p] = q;
      } else {
        TORCH_CHECK(table_probe(tab, mask, old, table_hash(static_cast<uint64_t>(old))) == g,
                    "torchrec_esd::", op, ": corrupt index (slot ", g, " is not the head of key ", old, ")");
        if (q >= 0) table_insert(tab, mask, old, q);
        else table_erase(tab, mask, old);
      }
      if (q >= 0) pv[q] = p;
    }
    nx[g] = -1;
    pv[g] = -1;
    if (k >= 0) {  // link g at the head of k's list
      const int64_t h = table_probe(tab, mask, k, table_hash(static_cast<uint64_t>(k)));
      nx[g] = h;
      if (h >= 0) pv[h] = g;
      TORCH_CHECK(table_insert(tab, mask, k, g), "torchrec_esd::", op, ": the head table is full (",
                  head.size(0), " rows)");
    }
    gk[g] = k;
  }
}

std::tuple<at::Tensor, at::Tensor> holder_index_lookup_cpu(const at::Tensor& head, const at::Tensor& next,
                                                           const at::Tensor& queries) {
  const char* op = "holder_index_lookup";
  check_head(op, head);
  check_long_vec(op, "next", next);
  check_long_vec(op, "queries", queries);
  const int64_t* tab = head.data_ptr<int64_t>();
  const uint64_t mask = static_cast<uint64_t>(head.size(0) - 1);
  const int64_t* nx = next.data_ptr<int64_t>();
  const int64_t n = next.numel();
  const int64_t* q = queries.data_ptr<int64_t>();
  std::vector<int64_t> pos, slot;
  pos.reserve(queries.numel());
  slot.reserve(queries.numel());
  // the head table is large (2 n rows): fetch the home row of the query kPrefetch ahead
  constexpr int64_t kPrefetch = 16;
  const int64_t nq = queries.numel();
  for (int64_t i = 0; i < nq; ++i) {
    if (i + kPrefetch < nq && q[i + kPrefetch] >= 0)
      __builtin_prefetch(tab + 2 * (table_hash(static_cast<uint64_t>(q[i + kPrefetch])) & mask));
    // and, half way, the second holder of that query (its head row is in cache by now)
    if (i + kPrefetch / 2 < nq && q[i + kPrefetch / 2] >= 0) {
      const int64_t h = table_probe(tab, mask, q[i + kPrefetch / 2],
                                    table_hash(static_cast<uint64_t>(q[i + kPrefetch / 2])));
      if (h >= 0 && h < n) __builtin_prefetch(nx + h);
    }
    TORCH_CHECK(q[i] >= 0, "torchrec_esd::", op, ": queries must be non-negative, got ", q[i]);
    int64_t g = table_probe(tab, mask, q[i], table_hash(static_cast<uint64_t>(q[i])));
    for (int64_t steps = 0; g >= 0; ++steps) {
      TORCH_CHECK(steps < n && g < n, "torchrec_esd::", op, ": corrupt holder list of key ", q[i]);
      pos.push_back(i);
      slot.push_back(g);
      g = nx[g];
    }
  }
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto p = at::empty({static_cast<int64_t>(pos.size())}, opts);
  auto s = at::empty({static_cast<int64_t>(slot.size())}, opts);
  std::copy(pos.begin(), pos.end(), p.data_ptr<int64_t>());
  std::copy(slot.begin(), slot.end(), s.data_ptr<int64_t>());
  return {p, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> holder_index_read_cpu(
    const at::Tensor& head, const at::Tensor& next, const at::Tensor& base, const at::Tensor& bucket_worker,
    int64_t shift, const at::Tensor& lag, const at::Tensor& dirty, const at::Tensor& queries) {
  const char* op = "holder_index_read";
  const auto [pos, slots] = holder_index_lookup_cpu(head, next, queries);
  const int64_t n = next.numel();
  check_long_vec(op, "base", base);
  check_long_vec(op, "bucket_worker", bucket_worker);
  check_long_vec(op, "lag", lag, n);
  TORCH_CHECK(dirty.device().is_cpu() && dirty.scalar_type() == at::kBool && dirty.dim() == 1 &&
                  dirty.is_contiguous() && dirty.numel() == n,
              "torchrec_esd::", op, ": dirty must be a contiguous 1-D CPU bool tensor with ", n, " entries");
  const int64_t W = base.numel() - 1;
  TORCH_CHECK(W >= 0 && base.data_ptr<int64_t>()[W] == n, "torchrec_esd::", op,
              ": base must end at the index's ", n, " global slots");
  TORCH_CHECK(shift >= 0 && shift < 63, "torchrec_esd::", op, ": shift must be in [0, 63)");
  const int64_t H = slots.numel();
  auto worker = at::empty({H}, slots.options());
  auto outdated = at::empty({H}, dirty.options());
  auto dirt = at::empty({H}, dirty.options());
  const int64_t* g = slots.data_ptr<int64_t>();
  const int64_t* bs = base.data_ptr<int64_t>();
  const int64_t* bw = bucket_worker.data_ptr<int64_t>();
  const int64_t nb = bucket_worker.numel();
  const int64_t* lg = lag.data_ptr<int64_t>();
  const bool* dt = dirty.data_ptr<bool>();
  int64_t* wo = worker.data_ptr<int64_t>();
  bool* od = outdated.data_ptr<bool>();
  bool* dd = dirt.data_ptr<bool>();
  // the per-slot state is read at the hits (random in [n]): fetched kPrefetch hits ahead
  constexpr int64_t kPrefetch = 16;
  for (int64_t i = 0; i < H; ++i) {
    if (i + kPrefetch < H) {
      __builtin_prefetch(lg + g[i + kPrefetch]);
      __builtin_prefetch(dt + g[i + kPrefetch]);
    }
    const int64_t s = g[i];
    int64_t w;
    if (nb > 0) {  // buckets of 2^shift slots lie within at most two workers
      TORCH_CHECK((s >> shift) < nb, "torchrec_esd::", op, ": slot ", s, " outside the buckets");
      w = bw[s >> shift];
      if (w + 1 <= W && s >= bs[w + 1]) ++w;
    } else {  // the last worker whose range starts at or before s
      w = static_cast<int64_t>(std::upper_bound(bs, bs + W + 1, s) - bs) - 1;
    }
    wo[i] = w;
    dd[i] = dt[s];
    od[i] = lg[s] > 0 && !dt[s];
  }
  return {pos, worker, outdated, dirt};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("holder_index_sync", &holder_index_sync_cpu);
  m.impl("holder_index_lookup", &holder_index_lookup_cpu);
  m.impl("holder_index_read", &holder_index_read_cpu);
}

}  // namespace torchrec_esd
