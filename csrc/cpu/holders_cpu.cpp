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
// old key, link the new one at its list's head); it returns the keys that left a slot.  holder_index_lookup walks
// the lists of the query keys: O(len(queries) + hits), several lists side by side so that
// their hops' memory loads overlap (holder_walk).  holder_index_read is the lookup plus every
// hit's worker (by buckets of slots, HolderIndex.slot_workers) and its slot's outdated / dirty
// flags, read in the same walk.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "../esd_checks.h"
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
  check_cpu_tensor(op, "head", head, at::kLong, 2);
  check_slots(op, "head", head);
}

}  // namespace

at::Tensor holder_index_sync_cpu(at::Tensor head, at::Tensor next, at::Tensor prev, at::Tensor gkey, int64_t base,
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
  std::vector<int64_t> left;  // the keys that left a slot
  for (int64_t s = 0; s < S; ++s) {
    const int64_t g = base + s;
    const int64_t k = sk[s] < 0 ? -1 : sk[s];
    const int64_t old = gk[g];
    if (old == k) continue;
    if (old >= 0) {  // unlink g from old's list
      left.push_back(old);
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
  auto out = at::empty({static_cast<int64_t>(left.size())}, slot_keys.options());
  std::copy(left.begin(), left.end(), out.data_ptr<int64_t>());
  return out;
}

namespace {

// The hits of the query keys' holder lists, tagged by query, in walk order (see
// holder_walk); with `state` also every hit's slot flags (bit 0: dirty, bit 1: lag > 0).
struct HolderHits {
  std::vector<int64_t> count;  // hits per query
  std::vector<int64_t> tag, slot;
  std::vector<uint8_t> flags;
  bool in_order = false;  // walked one list after the other: already in query order
};

// `next` larger than this (global slots) is walked kLanes lists side by side (lanes = -1).  On a
// synthetic index with hot rows in every cache (8 000 queries, session 15's machine): 2^18 slots
// 2.1 ms either way, 2^19 13.3 -> 5.0 ms, 2^20 40.9 -> 10.5 ms; on small ones (4 workers, ~2^17
// slots) one list after the other is up to ~1.5x faster (the side-by-side bookkeeping).
constexpr int64_t kLanesFromSlots = int64_t{1} << 18;

// Every hop of a holder list is a load at a random global slot (next is 8 n bytes): one
// list walked alone waits a memory latency per hop.  kLanes lists are walked side by side,
// one hop of each per round, each lane's next slot (and, with `lag`, its slot state)
// prefetched a round ahead; a lane that reaches its list's end takes the next query (its
// head row prefetched kAhead queries earlier).  The hits come out interleaved, tagged by
// query: holder_hits_scatter puts them back in the order of one walk after the other.
template <bool kState>
HolderHits holder_walk(const char* op, const int64_t* tab, uint64_t mask, const int64_t* nx, int64_t n,
                       const int64_t* q, int64_t nq, const int64_t* lg, const bool* dt, int64_t lanes) {
  for (int64_t i = 0; i < nq; ++i)
    TORCH_CHECK(q[i] >= 0, "torchrec_esd::", op, ": queries must be non-negative, got ", q[i]);
  TORCH_CHECK(lanes >= -1, "torchrec_esd::", op, ": lanes must be -1 (by size), 0 or positive, got ", lanes);
  if (lanes == 0 || (lanes < 0 && n <= kLanesFromSlots)) {
    // a small index stays in the caches: one list after the other, the next query's home row
    // prefetched kAhead queries ahead (the side-by-side walk's bookkeeping costs more here)
    constexpr int64_t kAhead = 16;
    std::vector<int64_t> tag, slot;
    tag.reserve(nq);
    slot.reserve(nq);
    for (int64_t i = 0; i < nq; ++i) {
      if (i + kAhead < nq) __builtin_prefetch(tab + 2 * (table_hash(static_cast<uint64_t>(q[i + kAhead])) & mask));
      int64_t g = table_probe(tab, mask, q[i], table_hash(static_cast<uint64_t>(q[i])));
      for (int64_t steps = 0; g >= 0; ++steps) {
        TORCH_CHECK(steps < n && g < n, "torchrec_esd::", op, ": corrupt holder list of key ", q[i]);
        tag.push_back(i);
        slot.push_back(g);
        g = nx[g];
      }
    }
    return {{}, std::move(tag), std::move(slot), {}, true};  // no flags: the caller reads them
  }
  constexpr int kMaxLanes = 64;
  const int kLanes = lanes < 0 ? 24 : static_cast<int>(std::min<int64_t>(lanes, kMaxLanes));
  const int64_t kAhead = 2 * kLanes;
  auto home = [&](int64_t i) { __builtin_prefetch(tab + 2 * (table_hash(static_cast<uint64_t>(q[i])) & mask)); };
  auto fetch = [&](int64_t g) {
    __builtin_prefetch(nx + g);
    if constexpr (kState) {
      __builtin_prefetch(lg + g);
      __builtin_prefetch(dt + g);
    }
  };
  for (int64_t i = 0; i < std::min(nq, kAhead); ++i) home(i);
  std::vector<int64_t> count(nq, 0), tag, slot;
  std::vector<uint8_t> flags;
  tag.reserve(nq);
  slot.reserve(nq);
  if constexpr (kState) flags.reserve(nq);
  int64_t lane_q[kMaxLanes], lane_g[kMaxLanes], lane_steps[kMaxLanes];
  int64_t taken = 0;  // queries given to lanes so far
  // lane l takes the next query with a non-empty list (-1 when none is left)
  auto start = [&](int l) {
    while (taken < nq) {
      const int64_t i = taken++;
      if (i + kAhead < nq) home(i + kAhead);
      const int64_t g = table_probe(tab, mask, q[i], table_hash(static_cast<uint64_t>(q[i])));
      if (g >= 0) {
        TORCH_CHECK(g < n, "torchrec_esd::", op, ": corrupt holder list of key ", q[i]);
        fetch(g);
        lane_q[l] = i;
        lane_g[l] = g;
        lane_steps[l] = 0;
        return;
      }
    }
    lane_q[l] = -1;
  };
  int active = 0;
  for (int l = 0; l < kLanes; ++l) {
    start(l);
    active += lane_q[l] >= 0;
  }
  while (active > 0) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t i = lane_q[l];
      if (i < 0) continue;
      const int64_t g = lane_g[l];
      tag.push_back(i);
      slot.push_back(g);
      if constexpr (kState) flags.push_back(static_cast<uint8_t>(dt[g] ? 1 : 0) | static_cast<uint8_t>(lg[g] > 0 ? 2 : 0));
      ++count[i];
      const int64_t h = nx[g];
      TORCH_CHECK(++lane_steps[l] < n && h < n, "torchrec_esd::", op, ": corrupt holder list of key ", q[i]);
      if (h >= 0) {
        fetch(h);
        lane_g[l] = h;
      } else {
        start(l);
        active -= lane_q[l] < 0;
      }
    }
  }
  return {std::move(count), std::move(tag), std::move(slot), std::move(flags), false};
}

// Hit j's place in query order for the interleaved walk's hits (a stable counting sort by tag:
// within a query, list order); hits.count becomes the queries' write cursors.
std::vector<int64_t> holder_hits_order(HolderHits& hits) {
  std::vector<int64_t> at(hits.tag.size());
  int64_t acc = 0;
  for (auto& c : hits.count) {
    const int64_t k = c;
    c = acc;
    acc += k;
  }
  for (size_t j = 0; j < hits.tag.size(); ++j) at[j] = hits.count[hits.tag[j]]++;
  return at;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> holder_index_lookup_cpu(const at::Tensor& head, const at::Tensor& next,
                                                           const at::Tensor& queries, int64_t lanes) {
  const char* op = "holder_index_lookup";
  check_head(op, head);
  check_long_vec(op, "next", next);
  check_long_vec(op, "queries", queries);
  HolderHits hits = holder_walk<false>(op, head.data_ptr<int64_t>(), static_cast<uint64_t>(head.size(0) - 1),
                                next.data_ptr<int64_t>(), next.numel(), queries.data_ptr<int64_t>(),
                                queries.numel(), nullptr, nullptr, lanes);
  const int64_t H = static_cast<int64_t>(hits.tag.size());
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto p = at::empty({H}, opts);
  auto s = at::empty({H}, opts);
  int64_t* pp = p.data_ptr<int64_t>();
  int64_t* sp = s.data_ptr<int64_t>();
  if (hits.in_order) {
    std::copy(hits.tag.begin(), hits.tag.end(), pp);
    std::copy(hits.slot.begin(), hits.slot.end(), sp);
    return {p, s};
  }
  const std::vector<int64_t> at_ = holder_hits_order(hits);
  for (int64_t j = 0; j < H; ++j) {
    pp[at_[j]] = hits.tag[j];
    sp[at_[j]] = hits.slot[j];
  }
  return {p, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> holder_index_read_cpu(
    const at::Tensor& head, const at::Tensor& next, const at::Tensor& base, const at::Tensor& bucket_worker,
    int64_t shift, const at::Tensor& lag, const at::Tensor& dirty, const at::Tensor& queries, int64_t lanes) {
  const char* op = "holder_index_read";
  check_head(op, head);
  check_long_vec(op, "next", next);
  check_long_vec(op, "queries", queries);
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
  // one walk reads every hit's slot state with its list (prefetched with the hop)
  HolderHits hits = holder_walk<true>(op, head.data_ptr<int64_t>(), static_cast<uint64_t>(head.size(0) - 1),
                                next.data_ptr<int64_t>(), n, queries.data_ptr<int64_t>(), queries.numel(),
                                lag.data_ptr<int64_t>(), dirty.data_ptr<bool>(), lanes);
  // the interleaved walk's hits go to their places in query order; one list after the other
  // gives them in that order already
  const std::vector<int64_t> at_ = hits.in_order ? std::vector<int64_t>() : holder_hits_order(hits);
  const int64_t H = static_cast<int64_t>(hits.tag.size());
  const int64_t* lg = lag.data_ptr<int64_t>();
  const bool* dt = dirty.data_ptr<bool>();
  auto opts = at::TensorOptions().dtype(at::kLong);
  auto pos = at::empty({H}, opts);
  auto worker = at::empty({H}, opts);
  auto outdated = at::empty({H}, dirty.options());
  auto dirt = at::empty({H}, dirty.options());
  const int64_t* bs = base.data_ptr<int64_t>();
  const int64_t* bw = bucket_worker.data_ptr<int64_t>();
  const int64_t nb = bucket_worker.numel();
  int64_t* po = pos.data_ptr<int64_t>();
  int64_t* wo = worker.data_ptr<int64_t>();
  bool* od = outdated.data_ptr<bool>();
  bool* dd = dirt.data_ptr<bool>();
  // in walk order the slot state was read with the walk; in query order (one list after the
  // other) it is read here, fetched kPrefetch hits ahead
  constexpr int64_t kPrefetch = 16;
  for (int64_t j = 0; j < H; ++j) {
    const int64_t s = hits.slot[j];
    if (hits.in_order && j + kPrefetch < H) {
      __builtin_prefetch(lg + hits.slot[j + kPrefetch]);
      __builtin_prefetch(dt + hits.slot[j + kPrefetch]);
    }
    int64_t w;
    if (nb > 0) {  // buckets of 2^shift slots lie within at most two workers
      TORCH_CHECK((s >> shift) < nb, "torchrec_esd::", op, ": slot ", s, " outside the buckets");
      w = bw[s >> shift];
      if (w + 1 <= W && s >= bs[w + 1]) ++w;
    } else {  // the last worker whose range starts at or before s
      w = static_cast<int64_t>(std::upper_bound(bs, bs + W + 1, s) - bs) - 1;
    }
    const int64_t k = hits.in_order ? j : at_[j];
    const uint8_t f = hits.in_order ? static_cast<uint8_t>((dt[s] ? 1 : 0) | (lg[s] > 0 ? 2 : 0)) : hits.flags[j];
    po[k] = hits.tag[j];
    wo[k] = w;
    dd[k] = (f & 1) != 0;
    od[k] = f == 2;  // lag > 0 and not dirty
  }
  return {pos, worker, outdated, dirt};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("holder_index_sync", &holder_index_sync_cpu);
  m.impl("holder_index_lookup", &holder_index_lookup_cpu);
  m.impl("holder_index_read", &holder_index_read_cpu);
}

}  // namespace torchrec_esd
