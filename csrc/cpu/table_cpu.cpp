// CPU kernels of the id-table operators: id_table_build, id_table_lookup,
// sample_cost_matrix and unique_keys_per_group (semantics: reference_ops.py).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "../esd_checks.h"
#include "../table_common.h"

namespace torchrec_esd {

namespace {

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), "torchrec_esd::", op, ": CPU kernel got ", name, " on ",
              t.device(), "; all tensors must be on the same device");
}

// Chunks [0, n) into at most one chunk per thread (>= `grain` items each) and
// returns the chunk boundaries; used where a pass needs per-chunk state.
std::vector<int64_t> chunk_bounds(int64_t n, int64_t grain) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t chunks = std::max<int64_t>(1, std::min(threads, n / std::max<int64_t>(grain, 1)));
  std::vector<int64_t> b(chunks + 1);
  for (int64_t c = 0; c <= chunks; ++c) b[c] = n * c / chunks;
  return b;
}

// Runs f(c) for every chunk c in parallel (one task per chunk).
template <typename F>
void for_each_chunk(int64_t chunks, const F& f) {
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) f(c);
  });
}

constexpr int64_t kPrefetchGroup = 32;    // lookups hashed + prefetched ahead
constexpr int64_t kPrefetchDistance = 32;  // probes prefetched ahead in cost_kernel

inline void prefetch_slot(const int64_t* slots, uint64_t s) {
  __builtin_prefetch(slots + 2 * s, 0, 3);
}

}  // namespace

// ---------------------------------------------------------------------------
// id_table_build
// ---------------------------------------------------------------------------

// Robin Hood insertion with ties broken by key: while probing, a key takes
// the slot of an occupant that is closer to its own home (or equally far with
// a larger key) and carries the occupant on.  Every cluster of the result is
// sorted by (home, key) in circular order, which is the canonical layout of
// reference_ops.id_table_build_ref whatever the insertion order.
at::Tensor id_table_build_cpu(const at::Tensor& keys) {
  const char* op = "id_table_build";
  check_index_vector(op, "keys", keys);
  check_cpu(op, "keys", keys);
  const int64_t n = keys.numel();
  const int64_t cap = table_capacity(n);
  const uint64_t mask = static_cast<uint64_t>(cap - 1);
  at::Tensor slots = at::full({cap, 2}, kEmptyKey, keys.options().dtype(at::kLong));
  if (n == 0) return slots;
  int64_t* out = slots.data_ptr<int64_t>();
  int64_t min_dup = std::numeric_limits<int64_t>::max();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "id_table_build_cpu", [&] {
    const index_t* in = keys.data_ptr<index_t>();
    uint64_t h[kPrefetchGroup];
    for (int64_t g0 = 0; g0 < n; g0 += kPrefetchGroup) {
      const int64_t g1 = std::min<int64_t>(n, g0 + kPrefetchGroup);
      for (int64_t i = g0; i < g1; ++i) {
        const int64_t k = static_cast<int64_t>(in[i]);
        TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", k,
                    " at position ", i);
        h[i - g0] = table_hash(static_cast<uint64_t>(k));
        __builtin_prefetch(out + 2 * (h[i - g0] & mask), 1, 3);
      }
      for (int64_t i = g0; i < g1; ++i) {
        int64_t k = static_cast<int64_t>(in[i]);
        int64_t ix = i;
        uint64_t s = h[i - g0] & mask;
        uint64_t d = 0;  // distance of (k, ix) from its home
        while (true) {
          const int64_t ok = out[2 * s];
          if (ok == kEmptyKey) {
            out[2 * s] = k;
            out[2 * s + 1] = ix;
            break;
          }
          if (ok == k) {  // only reachable for the key being inserted
            min_dup = std::min(min_dup, k);
            break;
          }
          const uint64_t od = (s - (table_hash(static_cast<uint64_t>(ok)) & mask)) & mask;
          if (od < d || (od == d && k < ok)) {
            const int64_t oix = out[2 * s + 1];
            out[2 * s] = k;
            out[2 * s + 1] = ix;
            k = ok;
            ix = oix;
            d = od;
          }
          s = (s + 1) & mask;
          ++d;
        }
      }
    }
  });
  TORCH_CHECK(min_dup == std::numeric_limits<int64_t>::max(), "torchrec_esd::", op,
              ": keys must be unique, found duplicate key ", min_dup);
  return slots;
}

// ---------------------------------------------------------------------------
// id_table_lookup
// ---------------------------------------------------------------------------

at::Tensor id_table_lookup_cpu(const at::Tensor& slots, const at::Tensor& queries) {
  const char* op = "id_table_lookup";
  check_slots(op, "slots", slots);
  check_index_vector(op, "queries", queries);
  check_same_device(op, "queries", queries, "slots", slots);
  check_cpu(op, "slots", slots);
  const int64_t n = queries.numel();
  at::Tensor out = at::empty({n}, queries.options().dtype(at::kLong));
  const int64_t* tab = slots.data_ptr<int64_t>();
  const uint64_t mask = static_cast<uint64_t>(slots.size(0) - 1);
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_INDEX_TYPES(queries.scalar_type(), "id_table_lookup_cpu", [&] {
    const index_t* q = queries.data_ptr<index_t>();
    at::parallel_for(0, n, 1 << 12, [&](int64_t b, int64_t e) {
      // Hash a group of queries and prefetch their home slots before probing,
      // so that the (cache-missing) table reads overlap.
      uint64_t h[kPrefetchGroup];
      for (int64_t g0 = b; g0 < e; g0 += kPrefetchGroup) {
        const int64_t g1 = std::min<int64_t>(e, g0 + kPrefetchGroup);
        for (int64_t i = g0; i < g1; ++i) {
          const int64_t k = static_cast<int64_t>(q[i]);
          TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": queries must be non-negative, got ", k,
                      " at position ", i);
          h[i - g0] = table_hash(static_cast<uint64_t>(k));
          prefetch_slot(tab, h[i - g0] & mask);
        }
        for (int64_t i = g0; i < g1; ++i)
          o[i] = table_probe(tab, mask, static_cast<int64_t>(q[i]), h[i - g0]);
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// sample_cost_matrix
// ---------------------------------------------------------------------------

namespace {

struct WorkerTable {
  const int64_t* slots;
  uint64_t mask;
  const double* weights;
  int64_t num_weights;
  double miss;
};

// The batch is cut into segments of whole samples (about kSegmentKeys keys,
// more segments than threads); one thread handles a segment at a time:
//   1. de-duplicates the segment's keys with a private hash map (uid per key,
//      Zipf batches repeat hot keys a lot),
//   2. probes every worker's table once per distinct key -> val[uid, w],
//   3. adds, for every sample, the val rows of its distinct keys to out[b, :].
// So each (distinct key, worker) pair costs one probe, and each key occurrence
// one contiguous W-vector add instead of W random table probes.
constexpr int64_t kSegmentKeys = 65536;
constexpr int64_t kWorkerTile = 4;

template <typename index_t, typename offset_t>
void cost_kernel(const index_t* keys, const offset_t* offsets, int64_t B,
                 const std::vector<WorkerTable>& tables, double* out) {
  const char* op = "sample_cost_matrix";
  const int64_t W = static_cast<int64_t>(tables.size());
  const int64_t N = static_cast<int64_t>(offsets[B]);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target =
      std::max<int64_t>(4096, std::min<int64_t>(kSegmentKeys, N / (4 * threads) + 1));
  std::vector<int64_t> seg{0};
  for (int64_t b = 1; b < B; ++b)
    if (static_cast<int64_t>(offsets[b]) - static_cast<int64_t>(offsets[seg.back()]) >= target)
      seg.push_back(b);
  seg.push_back(B);
  const int64_t S = static_cast<int64_t>(seg.size()) - 1;
  uint64_t max_mask = 1;
  for (const WorkerTable& tw : tables) max_mask = std::max(max_mask, tw.mask);
  int table_bits = 0;
  while ((uint64_t{1} << table_bits) <= max_mask) ++table_bits;
  const int sort_bits = std::min(table_bits, 12);
  const int sort_shift = table_bits - sort_bits;

  at::parallel_for(0, S, 1, [&](int64_t q0, int64_t q1) {
    std::vector<int64_t> map;     // private map: rows (key, uid), key -1 when empty
    std::vector<int32_t> uid;     // uid of every key of the segment
    std::vector<int64_t> dkey;    // distinct keys, by uid
    std::vector<uint64_t> dhash;  // their hashes
    std::vector<double> val;      // [U, W] weight of every distinct key per worker
    std::vector<int64_t> stamp;   // per uid: last sample that counted it
    std::vector<int64_t> idx;     // index found in the current worker's table, per uid
    std::vector<int64_t> hist(int64_t{1} << sort_bits);
    std::vector<int32_t> kept;      // uids of the occurrences that count, by sample
    std::vector<int64_t> kept_end;  // end of every sample's run in kept
    std::vector<int32_t> renum;
    std::vector<int64_t> skey;
    std::vector<uint64_t> shash;
    uint64_t h[kPrefetchGroup];
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t b0 = seg[q], b1 = seg[q + 1];
      const int64_t lo = static_cast<int64_t>(offsets[b0]);
      const int64_t n = static_cast<int64_t>(offsets[b1]) - lo;
      TORCH_CHECK(n < (int64_t{1} << 31), "torchrec_esd::", op,
                  ": a sample has more than 2^31 keys");
      const int64_t cap = table_capacity(n);
      const uint64_t mask = static_cast<uint64_t>(cap - 1);
      map.assign(2 * cap, kEmptyKey);
      uid.resize(n);
      kept_end.resize(b1 - b0);
      dkey.clear();
      dhash.clear();
      // 1. de-duplicate (hash a group of keys and prefetch their slots first)
      for (int64_t g0 = 0; g0 < n; g0 += kPrefetchGroup) {
        const int64_t g1 = std::min<int64_t>(n, g0 + kPrefetchGroup);
        for (int64_t j = g0; j < g1; ++j) {
          const int64_t k = static_cast<int64_t>(keys[lo + j]);
          TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", k,
                      " at position ", lo + j);
          h[j - g0] = table_hash(static_cast<uint64_t>(k));
          __builtin_prefetch(map.data() + 2 * (h[j - g0] & mask), 1, 1);
        }
        for (int64_t j = g0; j < g1; ++j) {
          const int64_t k = static_cast<int64_t>(keys[lo + j]);
          uint64_t sl = h[j - g0] & mask;
          while (map[2 * sl] != k && map[2 * sl] != kEmptyKey) sl = (sl + 1) & mask;
          if (map[2 * sl] == kEmptyKey) {
            map[2 * sl] = k;
            map[2 * sl + 1] = static_cast<int64_t>(dkey.size());
            dkey.push_back(k);
            dhash.push_back(h[j - g0]);
          }
          uid[j] = static_cast<int32_t>(map[2 * sl + 1]);
        }
      }
      // Renumber the distinct keys in (coarse) order of their slot in the
      // largest worker table, so that step 2 sweeps every table nearly
      // sequentially instead of jumping around it (counting sort on the top
      // <= 12 bits of the slot).
      const int64_t U = static_cast<int64_t>(dkey.size());
      {
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t u = 0; u < U; ++u) ++hist[(dhash[u] & max_mask) >> sort_shift];
        int64_t acc = 0;
        for (auto& c : hist) {
          const int64_t v = c;
          c = acc;
          acc += v;
        }
        renum.resize(U);
        skey.resize(U);
        shash.resize(U);
        for (int64_t u = 0; u < U; ++u) {
          const int64_t r = hist[(dhash[u] & max_mask) >> sort_shift]++;
          renum[u] = static_cast<int32_t>(r);
          skey[r] = dkey[u];
          shash[r] = dhash[u];
        }
        dkey.swap(skey);
        dhash.swap(shash);
        for (int64_t j = 0; j < n; ++j) uid[j] = renum[uid[j]];
      }
      // Occurrences that count: the first of every uid in its sample (stamp[u]
      // remembers the last sample that counted uid u), in order.
      kept.clear();
      stamp.assign(U, -1);
      for (int64_t bb = b0; bb < b1; ++bb) {
        const int64_t j0 = static_cast<int64_t>(offsets[bb]) - lo;
        const int64_t j1 = static_cast<int64_t>(offsets[bb + 1]) - lo;
        for (int64_t j = j0; j < j1; ++j) {
          const int32_t u = uid[j];
          if (stamp[u] == bb) continue;
          stamp[u] = bb;
          kept.push_back(u);
        }
        kept_end[bb - b0] = static_cast<int64_t>(kept.size());
      }
      // Workers in tiles of kWorkerTile, so that val (U x tile) stays in cache:
      // 2. one probe per (distinct key, worker) -> val[u, t]; slots, then
      //    weights, are prefetched kPrefetchDistance probes ahead;
      // 3. every sample adds the val rows of its kept keys to out[b, tile].
      for (int64_t w0 = 0; w0 < W; w0 += kWorkerTile) {
        const int64_t T = std::min(kWorkerTile, W - w0);
        val.resize(U * T);
        idx.resize(U);
        for (int64_t t = 0; t < T; ++t) {
          const int64_t w = w0 + t;
          const WorkerTable& tw = tables[w];
          for (int64_t u = 0; u < std::min(U, kPrefetchDistance); ++u)
            prefetch_slot(tw.slots, dhash[u] & tw.mask);
          for (int64_t u = 0; u < U; ++u) {
            if (u + kPrefetchDistance < U)
              prefetch_slot(tw.slots, dhash[u + kPrefetchDistance] & tw.mask);
            idx[u] = table_probe(tw.slots, tw.mask, dkey[u], dhash[u]);
          }
          for (int64_t u = 0; u < U; ++u) {
            if (u + kPrefetchDistance < U && idx[u + kPrefetchDistance] >= 0)
              __builtin_prefetch(tw.weights + idx[u + kPrefetchDistance], 0, 3);
            const int64_t i = idx[u];
            double v = tw.miss;
            if (i >= 0) {
              TORCH_CHECK(i < tw.num_weights, "torchrec_esd::", op, ": table slots[", w,
                          "] stores index ", i, " but weights[", w, "] has only ",
                          tw.num_weights, " entries");
              v = tw.weights[i];
            }
            val[u * T + t] = v;
          }
        }
        const double* vr = val.data();
        int64_t j = 0;
        for (int64_t bb = b0; bb < b1; ++bb) {
          double* ob = out + bb * W + w0;
          const int64_t je = kept_end[bb - b0];
          if (T == kWorkerTile) {
            double acc[kWorkerTile] = {};
            for (; j < je; ++j) {
              const double* r = vr + static_cast<int64_t>(kept[j]) * kWorkerTile;
              for (int64_t t = 0; t < kWorkerTile; ++t) acc[t] += r[t];
            }
            for (int64_t t = 0; t < kWorkerTile; ++t) ob[t] = acc[t];
          } else {
            for (; j < je; ++j) {
              const double* r = vr + static_cast<int64_t>(kept[j]) * T;
              for (int64_t t = 0; t < T; ++t) ob[t] += r[t];
            }
          }
        }
      }
    }
  });
}

template <typename offset_t>
void check_offsets_values(const offset_t* off, int64_t B, int64_t n) {
  const char* op = "sample_cost_matrix";
  TORCH_CHECK(static_cast<int64_t>(off[0]) == 0, "torchrec_esd::", op,
              ": offsets[0] must be 0, got ", static_cast<int64_t>(off[0]));
  std::atomic<bool> ok{true};
  at::parallel_for(0, B, 1 << 14, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      if (off[b + 1] < off[b]) ok.store(false, std::memory_order_relaxed);
  });
  TORCH_CHECK(ok.load(), "torchrec_esd::", op, ": offsets must be non-decreasing");
  TORCH_CHECK(static_cast<int64_t>(off[B]) == n, "torchrec_esd::", op,
              ": offsets[-1] must equal keys.numel() = ", n, ", got ",
              static_cast<int64_t>(off[B]));
}

}  // namespace

at::Tensor sample_cost_matrix_cpu(const at::Tensor& keys, const at::Tensor& offsets,
                                  at::TensorList slots, at::TensorList weights,
                                  const at::Tensor& miss_weight) {
  check_cost_args(keys, offsets, slots, weights, miss_weight);
  check_cpu("sample_cost_matrix", "keys", keys);
  const int64_t B = offsets.numel() - 1;
  const int64_t W = static_cast<int64_t>(slots.size());
  at::Tensor out = at::zeros({B, W}, keys.options().dtype(at::kDouble));
  std::vector<WorkerTable> tables(W);
  const double* miss = miss_weight.data_ptr<double>();
  for (int64_t w = 0; w < W; ++w) {
    tables[w] = WorkerTable{slots[w].data_ptr<int64_t>(),
                            static_cast<uint64_t>(slots[w].size(0) - 1),
                            weights[w].data_ptr<double>(), weights[w].numel(), miss[w]};
  }
  AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "sample_cost_matrix_offsets", [&] {
    using offset_t = index_t;
    const offset_t* off = offsets.data_ptr<offset_t>();
    check_offsets_values(off, B, keys.numel());
    if (B == 0 || W == 0) {
      // nothing to accumulate, but keys must still be valid
      TORCH_CHECK(keys.numel() == 0 || keys.min().item<int64_t>() >= 0,
                  "torchrec_esd::sample_cost_matrix: keys must be non-negative, got ",
                  keys.numel() ? keys.min().item<int64_t>() : 0);
      return;
    }
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "sample_cost_matrix_keys", [&] {
      cost_kernel<index_t, offset_t>(keys.data_ptr<index_t>(), off, B, tables,
                                     out.data_ptr<double>());
    });
  });
  return out;
}

// ---------------------------------------------------------------------------
// unique_keys_per_group
// ---------------------------------------------------------------------------

namespace {

int bit_width(uint64_t v) {
  int b = 0;
  while (v) ++b, v >>= 1;
  return b;
}

// Parallel LSD radix sort of `a` (values < 2^bits) with as few passes of
// <= 11-bit digits as possible; `buf` is scratch of the same size.  Digits on
// which all values agree are skipped.
void radix_sort_u64(std::vector<uint64_t>& a, std::vector<uint64_t>& buf, int bits) {
  const int64_t n = static_cast<int64_t>(a.size());
  if (bits == 0 || n < 2) return;
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const int64_t R = int64_t{1} << digit;
  const uint64_t dmask = static_cast<uint64_t>(R - 1);
  const std::vector<int64_t> cb = chunk_bounds(n, 1 << 15);
  const int64_t C = static_cast<int64_t>(cb.size()) - 1;
  std::vector<int64_t> hist(C * R);
  for (int shift = 0; shift < bits; shift += digit) {
    std::fill(hist.begin(), hist.end(), 0);
    const uint64_t* src = a.data();
    for_each_chunk(C, [&](int64_t c) {
      int64_t* h = hist.data() + c * R;
      for (int64_t i = cb[c]; i < cb[c + 1]; ++i) ++h[(src[i] >> shift) & dmask];
    });
    // exclusive prefix in (digit, chunk) order -> stable scatter offsets
    int64_t total = 0;
    bool single = false;
    for (int64_t d = 0; d < R; ++d) {
      int64_t dsum = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t v = hist[c * R + d];
        hist[c * R + d] = total;
        total += v;
        dsum += v;
      }
      if (dsum == n) single = true;
    }
    if (single) continue;  // every value has this digit: order unchanged
    uint64_t* dst = buf.data();
    for_each_chunk(C, [&](int64_t c) {
      int64_t* h = hist.data() + c * R;
      for (int64_t i = cb[c]; i < cb[c + 1]; ++i) dst[h[(src[i] >> shift) & dmask]++] = src[i];
    });
    a.swap(buf);
  }
}

// Serial LSD radix sort of a[0, n) (values < 2^bits, <= 11-bit digits, digits
// on which all values agree skipped); buf: scratch of n.  Small inputs use
// std::sort.  The result is in a.
void radix_sort_serial(uint64_t* a, uint64_t* buf, int64_t n, int bits,
                       std::vector<int64_t>& hist) {
  if (n < 2 || bits == 0) return;
  if (n <= 256) {
    std::sort(a, a + n);
    return;
  }
  const int passes = (bits + 10) / 11;
  const int digit = (bits + passes - 1) / passes;
  const int64_t R = int64_t{1} << digit;
  const uint64_t dmask = static_cast<uint64_t>(R - 1);
  hist.resize(R);
  uint64_t* src = a;
  uint64_t* dst = buf;
  for (int shift = 0; shift < bits; shift += digit) {
    std::fill(hist.begin(), hist.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++hist[(src[i] >> shift) & dmask];
    if (hist[(src[0] >> shift) & dmask] == n) continue;  // all share this digit
    int64_t acc = 0;
    for (int64_t d = 0; d < R; ++d) {
      const int64_t v = hist[d];
      hist[d] = acc;
      acc += v;
    }
    for (int64_t i = 0; i < n; ++i) dst[hist[(src[i] >> shift) & dmask]++] = src[i];
    std::swap(src, dst);
  }
  if (src != a) std::copy(src, src + n, a);
}

constexpr int64_t kMaxGroupedGroups = 4096;  // more groups: one packed global sort

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> unique_keys_per_group_cpu(
    const at::Tensor& keys, const at::Tensor& group, int64_t num_groups) {
  const char* op = "unique_keys_per_group";
  check_unique_args(keys, group, num_groups);
  check_cpu(op, "keys", keys);
  const int64_t n = keys.numel();
  const auto lopt = keys.options().dtype(at::kLong);
  if (n == 0) return {at::empty({0}, keys.options()), at::empty({0}, lopt), at::empty({0}, lopt)};

  const std::vector<int64_t> cb = chunk_bounds(n, 1 << 15);
  const int64_t C = static_cast<int64_t>(cb.size()) - 1;
  // Pass 1: check keys and groups, find the largest key (and, with few
  // groups, count every chunk's keys per group).
  const bool grouped = num_groups <= kMaxGroupedGroups;
  const int64_t G = grouped ? num_groups : 0;
  std::vector<int64_t> cmax(C, 0);
  std::vector<int64_t> ghist(C * G, 0);
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_keys", [&] {
    using key_t = index_t;
    const key_t* kp = keys.data_ptr<key_t>();
    AT_DISPATCH_INDEX_TYPES(group.scalar_type(), "unique_keys_per_group_group", [&] {
      const index_t* gp = group.data_ptr<index_t>();
      for_each_chunk(C, [&](int64_t c) {
        // branch-free min/max first (vectorises); locate a bad value only on error
        int64_t kmin = 0, kmax = 0, gmin = 0, gmax = 0;
        for (int64_t i = cb[c]; i < cb[c + 1]; ++i) {
          const int64_t k = static_cast<int64_t>(kp[i]);
          const int64_t g = static_cast<int64_t>(gp[i]);
          kmin = std::min(kmin, k);
          kmax = std::max(kmax, k);
          gmin = std::min(gmin, g);
          gmax = std::max(gmax, g);
        }
        if (kmin < 0 || gmin < 0 || gmax >= num_groups) {
          for (int64_t i = cb[c]; i < cb[c + 1]; ++i) {
            const int64_t k = static_cast<int64_t>(kp[i]);
            const int64_t g = static_cast<int64_t>(gp[i]);
            TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", k,
                        " at position ", i);
            TORCH_CHECK(g >= 0 && g < num_groups, "torchrec_esd::", op,
                        ": group values must be in [0, num_groups = ", num_groups, "), got ",
                        g, " at position ", i);
          }
        }
        cmax[c] = kmax;
        if (grouped) {
          int64_t* h = ghist.data() + c * G;
          for (int64_t i = cb[c]; i < cb[c + 1]; ++i) ++h[gp[i]];
        }
      });
    });
  });
  const int64_t max_key = *std::max_element(cmax.begin(), cmax.end());
  const int kbits = bit_width(static_cast<uint64_t>(max_key));
  const int gbits = bit_width(static_cast<uint64_t>(std::max<int64_t>(num_groups - 1, 0)));

  if (grouped) {
    // Few groups: scatter the keys into per-group runs (stable counting sort
    // by group), then sort and run-length encode every group on its own: the
    // groups are small enough to stay in cache, and independent (parallel).
    std::vector<int64_t> gstart(G + 1, 0);
    {
      int64_t acc = 0;
      for (int64_t g = 0; g < G; ++g) {
        gstart[g] = acc;
        for (int64_t c = 0; c < C; ++c) {
          const int64_t v = ghist[c * G + g];
          ghist[c * G + g] = acc;  // chunk c's write cursor in group g
          acc += v;
        }
      }
      gstart[G] = acc;
    }
    std::unique_ptr<uint64_t[]> v(new uint64_t[n]);  // every entry is written below
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_scatter", [&] {
      using key_t = index_t;
      const key_t* kp = keys.data_ptr<key_t>();
      AT_DISPATCH_INDEX_TYPES(group.scalar_type(), "unique_keys_per_group_scatter2", [&] {
        const index_t* gp = group.data_ptr<index_t>();
        for_each_chunk(C, [&](int64_t c) {
          int64_t* cur = ghist.data() + c * G;
          for (int64_t i = cb[c]; i < cb[c + 1]; ++i)
            v[cur[gp[i]]++] = static_cast<uint64_t>(kp[i]);
        });
      });
    });
    std::vector<int64_t> gunique(G + 1, 0);
    at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
      std::vector<uint64_t> buf;
      std::vector<int64_t> hist;
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t m = gstart[g + 1] - gstart[g];
        uint64_t* a = v.get() + gstart[g];
        buf.resize(m);
        radix_sort_serial(a, buf.data(), m, kbits, hist);
        int64_t u = 0;
        for (int64_t i = 0; i < m; ++i) u += (i == 0 || a[i] != a[i - 1]);
        gunique[g + 1] = u;
      }
    });
    for (int64_t g = 0; g < G; ++g) gunique[g + 1] += gunique[g];
    const int64_t u = gunique[G];
    at::Tensor out_k = at::empty({u}, keys.options());
    at::Tensor out_g = at::empty({u}, lopt);
    at::Tensor out_c = at::empty({u}, lopt);
    int64_t* og = out_g.data_ptr<int64_t>();
    int64_t* oc = out_c.data_ptr<int64_t>();
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_gout", [&] {
      index_t* ok = out_k.data_ptr<index_t>();
      at::parallel_for(0, G, 1, [&](int64_t g0, int64_t g1) {
        for (int64_t g = g0; g < g1; ++g) {
          const uint64_t* a = v.get() + gstart[g];
          const int64_t m = gstart[g + 1] - gstart[g];
          int64_t j = gunique[g] - 1;
          for (int64_t i = 0; i < m; ++i) {
            if (i == 0 || a[i] != a[i - 1]) {
              ++j;
              ok[j] = static_cast<index_t>(a[i]);
              og[j] = g;
              oc[j] = 0;
            }
            ++oc[j];
          }
        }
      });
    });
    return {out_k, out_g, out_c};
  }

  if (kbits + gbits <= 64) {
    // Many groups: radix sort of packed (group << kbits | key), then run lengths.
    std::vector<uint64_t> c(n), buf(n);
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_pack", [&] {
      using key_t = index_t;
      const key_t* kp = keys.data_ptr<key_t>();
      AT_DISPATCH_INDEX_TYPES(group.scalar_type(), "unique_keys_per_group_pack2", [&] {
        const index_t* gp = group.data_ptr<index_t>();
        for_each_chunk(C, [&](int64_t ch) {
          for (int64_t i = cb[ch]; i < cb[ch + 1]; ++i)
            c[i] = (static_cast<uint64_t>(gp[i]) << kbits) | static_cast<uint64_t>(kp[i]);
        });
      });
    });
    radix_sort_u64(c, buf, kbits + gbits);
    const uint64_t kmask = (uint64_t{1} << kbits) - 1;  // kbits <= 63: keys are int64 >= 0
    std::vector<int64_t> cstart(C + 1, 0);
    for_each_chunk(C, [&](int64_t ch) {
      int64_t m = 0;
      for (int64_t i = cb[ch]; i < cb[ch + 1]; ++i) m += (i == 0 || c[i] != c[i - 1]);
      cstart[ch + 1] = m;
    });
    for (int64_t ch = 0; ch < C; ++ch) cstart[ch + 1] += cstart[ch];
    const int64_t u = cstart[C];
    at::Tensor out_k = at::empty({u}, keys.options());
    at::Tensor out_g = at::empty({u}, lopt);
    at::Tensor out_c = at::empty({u}, lopt);
    int64_t* og = out_g.data_ptr<int64_t>();
    int64_t* oc = out_c.data_ptr<int64_t>();  // first holds run starts, then counts
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_out", [&] {
      index_t* ok = out_k.data_ptr<index_t>();
      for_each_chunk(C, [&](int64_t ch) {
        int64_t j = cstart[ch];
        for (int64_t i = cb[ch]; i < cb[ch + 1]; ++i) {
          if (i == 0 || c[i] != c[i - 1]) {
            ok[j] = static_cast<index_t>(c[i] & kmask);
            og[j] = static_cast<int64_t>(c[i] >> kbits);
            oc[j] = i;
            ++j;
          }
        }
      });
    });
    // counts = next run start - run start (chunk c's last run ends at the next
    // chunk's first start, read before that chunk overwrites it: do it serially
    // per chunk boundary, then in parallel inside chunks)
    std::vector<int64_t> next_start(C);
    for (int64_t ch = 0; ch < C; ++ch) next_start[ch] = cstart[ch + 1] < u ? oc[cstart[ch + 1]] : n;
    for_each_chunk(C, [&](int64_t ch) {
      for (int64_t j = cstart[ch]; j < cstart[ch + 1]; ++j)
        oc[j] = (j + 1 < cstart[ch + 1] ? oc[j + 1] : next_start[ch]) - oc[j];
    });
    return {out_k, out_g, out_c};
  }

  // General path (keys too wide to pack with the group): sort (group, key) pairs.
  std::vector<std::pair<int64_t, int64_t>> p(n);
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_pairs", [&] {
    using key_t = index_t;
    const key_t* kp = keys.data_ptr<key_t>();
    AT_DISPATCH_INDEX_TYPES(group.scalar_type(), "unique_keys_per_group_pairs2", [&] {
      const index_t* gp = group.data_ptr<index_t>();
      for (int64_t i = 0; i < n; ++i)
        p[i] = {static_cast<int64_t>(gp[i]), static_cast<int64_t>(kp[i])};
    });
  });
  std::sort(p.begin(), p.end());
  std::vector<int64_t> uk, ug, cnt;
  for (int64_t i = 0; i < n; ++i) {
    if (i == 0 || p[i] != p[i - 1]) {
      ug.push_back(p[i].first);
      uk.push_back(p[i].second);
      cnt.push_back(1);
    } else {
      ++cnt.back();
    }
  }
  const int64_t u = static_cast<int64_t>(uk.size());
  at::Tensor out_k = at::empty({u}, keys.options());
  at::Tensor out_g = at::from_blob(ug.data(), {u}, lopt).clone();
  at::Tensor out_c = at::from_blob(cnt.data(), {u}, lopt).clone();
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_out2", [&] {
    index_t* o = out_k.data_ptr<index_t>();
    for (int64_t j = 0; j < u; ++j) o[j] = static_cast<index_t>(uk[j]);
  });
  return {out_k, out_g, out_c};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("id_table_build", &id_table_build_cpu);
  m.impl("id_table_lookup", &id_table_lookup_cpu);
  m.impl("sample_cost_matrix", &sample_cost_matrix_cpu);
  m.impl("unique_keys_per_group", &unique_keys_per_group_cpu);
}

}  // namespace torchrec_esd
