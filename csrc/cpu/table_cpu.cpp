// CPU kernels of the id-table operators: id_table_build, id_table_lookup,
// sample_cost_matrix and unique_keys_per_group (semantics: reference_ops.py).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <limits>
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

}  // namespace

// ---------------------------------------------------------------------------
// id_table_build
// ---------------------------------------------------------------------------

at::Tensor id_table_build_cpu(const at::Tensor& keys) {
  const char* op = "id_table_build";
  check_index_vector(op, "keys", keys);
  check_cpu(op, "keys", keys);
  const int64_t n = keys.numel();
  const int64_t cap = table_capacity(n);
  const uint64_t mask = static_cast<uint64_t>(cap - 1);
  at::Tensor slots = at::full({cap, 2}, kEmptyKey, keys.options().dtype(at::kLong));
  if (n == 0) return slots;

  // Keys as int64 and their home slots (parallel).
  std::vector<int64_t> key(n);
  std::vector<int64_t> home(n);
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "id_table_build_cpu", [&] {
    const index_t* in = keys.data_ptr<index_t>();
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t k = static_cast<int64_t>(in[i]);
        TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", k,
                    " at position ", i);
        key[i] = k;
        home[i] = static_cast<int64_t>(table_hash(static_cast<uint64_t>(k)) & mask);
      }
    });
  });

  // Keys per home slot; e = first slot minimising the prefix sum of (count - 1)
  // is empty in any linear-probing table of these keys: start the table after it.
  std::vector<int64_t> count(cap, 0);
  for (int64_t i = 0; i < n; ++i) ++count[home[i]];
  int64_t run = 0, best = std::numeric_limits<int64_t>::max(), e = 0;
  for (int64_t s = 0; s < cap; ++s) {
    run += count[s] - 1;
    if (run < best) best = run, e = s;
  }
  const int64_t start = (e + 1) & static_cast<int64_t>(mask);

  // Counting sort by rotated home r = (home - start) mod cap, stable in position.
  std::vector<int64_t> bucket(cap + 1, 0);
  for (int64_t r = 0; r < cap; ++r) bucket[r + 1] = bucket[r] + count[(r + start) & mask];
  std::vector<int64_t> order(n);
  {
    std::vector<int64_t> cursor(bucket.begin(), bucket.end() - 1);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = (home[i] - start) & static_cast<int64_t>(mask);
      order[cursor[r]++] = i;
    }
  }
  // Sort every bucket by key (buckets are tiny: expected load <= 1/2); equal keys
  // share a home, so duplicates end up adjacent.
  std::atomic<int64_t> min_dup{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, cap, 1 << 12, [&](int64_t r0, int64_t r1) {
    int64_t local_dup = std::numeric_limits<int64_t>::max();
    for (int64_t r = r0; r < r1; ++r) {
      int64_t* b = order.data() + bucket[r];
      int64_t* en = order.data() + bucket[r + 1];
      if (en - b < 2) continue;
      std::sort(b, en, [&](int64_t x, int64_t y) { return key[x] < key[y]; });
      for (int64_t* p = b + 1; p < en; ++p)
        if (key[*p] == key[*(p - 1)]) local_dup = std::min(local_dup, key[*p]);
    }
    int64_t cur = min_dup.load();
    while (local_dup < cur && !min_dup.compare_exchange_weak(cur, local_dup)) {
    }
  });
  TORCH_CHECK(min_dup.load() == std::numeric_limits<int64_t>::max(), "torchrec_esd::", op,
              ": keys must be unique, found duplicate key ", min_dup.load());

  // Linear probing in that order: position p_i = max(r_i, p_{i-1} + 1) < cap.
  int64_t* out = slots.data_ptr<int64_t>();
  int64_t pos = -1;
  for (int64_t r = 0; r < cap; ++r) {
    for (int64_t j = bucket[r]; j < bucket[r + 1]; ++j) {
      pos = std::max(r, pos + 1);
      const int64_t s = (pos + start) & static_cast<int64_t>(mask);
      out[2 * s] = key[order[j]];
      out[2 * s + 1] = order[j];
    }
  }
  TORCH_INTERNAL_ASSERT(pos < cap, "id_table_build: probe sequence overflowed");
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
      for (int64_t i = b; i < e; ++i) {
        const int64_t k = static_cast<int64_t>(q[i]);
        TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": queries must be non-negative, got ", k,
                    " at position ", i);
        o[i] = table_probe(tab, mask, k, table_hash(static_cast<uint64_t>(k)));
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

template <typename index_t, typename offset_t>
void cost_kernel(const index_t* keys, const offset_t* offsets, int64_t B,
                 const std::vector<WorkerTable>& tables, double* out) {
  const char* op = "sample_cost_matrix";
  const int64_t W = static_cast<int64_t>(tables.size());
  constexpr int64_t kBlock = 256;  // samples per block: keeps buffers in cache
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> dkey;      // distinct keys of the block's bags
    std::vector<uint64_t> dhash;    // their hashes (shared by all workers)
    std::vector<int32_t> dsample;   // their sample, relative to the block
    std::vector<int64_t> tmp;
    for (int64_t s0 = b0; s0 < b1; s0 += kBlock) {
      const int64_t s1 = std::min(b1, s0 + kBlock);
      dkey.clear();
      dsample.clear();
      for (int64_t b = s0; b < s1; ++b) {
        const int64_t lo = static_cast<int64_t>(offsets[b]);
        const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
        const size_t bag_start = dkey.size();
        if (hi - lo <= 32) {
          // small bag: keep the first occurrence of every key (quadratic scan)
          for (int64_t j = lo; j < hi; ++j) {
            const int64_t k = static_cast<int64_t>(keys[j]);
            TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", k,
                        " at position ", j);
            bool seen = false;
            for (size_t t = bag_start; t < dkey.size(); ++t) seen |= dkey[t] == k;
            if (!seen) dkey.push_back(k);
          }
        } else {
          tmp.assign(keys + lo, keys + hi);
          std::sort(tmp.begin(), tmp.end());
          TORCH_CHECK(tmp.front() >= 0, "torchrec_esd::", op,
                      ": keys must be non-negative, got ", tmp.front(), " in sample ", b);
          for (size_t t = 0; t < tmp.size(); ++t)
            if (t == 0 || tmp[t] != tmp[t - 1]) dkey.push_back(tmp[t]);
        }
        dsample.resize(dkey.size(), static_cast<int32_t>(b - s0));
      }
      const int64_t nd = static_cast<int64_t>(dkey.size());
      dhash.resize(nd);
      for (int64_t t = 0; t < nd; ++t) dhash[t] = table_hash(static_cast<uint64_t>(dkey[t]));
      for (int64_t w = 0; w < W; ++w) {
        const WorkerTable& tw = tables[w];
        double* o = out + s0 * W + w;
        for (int64_t t = 0; t < nd; ++t) {
          const int64_t idx = table_probe(tw.slots, tw.mask, dkey[t], dhash[t]);
          double v = tw.miss;
          if (idx >= 0) {
            TORCH_CHECK(idx < tw.num_weights, "torchrec_esd::", op, ": table slots[", w,
                        "] stores index ", idx, " but weights[", w, "] has only ",
                        tw.num_weights, " entries");
            v = tw.weights[idx];
          }
          o[static_cast<int64_t>(dsample[t]) * W] += v;
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

// Parallel LSD radix sort of `a` (values < 2^bits), 8-bit digits; `buf` is
// scratch of the same size.  Digits on which all values agree are skipped.
void radix_sort_u64(std::vector<uint64_t>& a, std::vector<uint64_t>& buf, int bits) {
  const int64_t n = static_cast<int64_t>(a.size());
  const std::vector<int64_t> cb = chunk_bounds(n, 1 << 15);
  const int64_t C = static_cast<int64_t>(cb.size()) - 1;
  std::vector<int64_t> hist(C * 256);
  for (int shift = 0; shift < bits; shift += 8) {
    std::fill(hist.begin(), hist.end(), 0);
    const uint64_t* src = a.data();
    for_each_chunk(C, [&](int64_t c) {
      int64_t* h = hist.data() + c * 256;
      for (int64_t i = cb[c]; i < cb[c + 1]; ++i) ++h[(src[i] >> shift) & 255];
    });
    // exclusive prefix in (digit, chunk) order -> stable scatter offsets
    int64_t total = 0;
    bool single = false;
    for (int d = 0; d < 256; ++d) {
      int64_t dsum = 0;
      for (int64_t c = 0; c < C; ++c) {
        const int64_t v = hist[c * 256 + d];
        hist[c * 256 + d] = total;
        total += v;
        dsum += v;
      }
      if (dsum == n) single = true;
    }
    if (single) continue;  // every value has this digit: order unchanged
    uint64_t* dst = buf.data();
    for_each_chunk(C, [&](int64_t c) {
      int64_t* h = hist.data() + c * 256;
      for (int64_t i = cb[c]; i < cb[c + 1]; ++i) dst[h[(src[i] >> shift) & 255]++] = src[i];
    });
    a.swap(buf);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> unique_keys_per_group_cpu(
    const at::Tensor& keys, const at::Tensor& group, int64_t num_groups) {
  const char* op = "unique_keys_per_group";
  check_unique_args(keys, group, num_groups);
  check_cpu(op, "keys", keys);
  const int64_t n = keys.numel();

  // Read keys and groups, check them and find the largest key (parallel).
  std::vector<int64_t> k64(n), g64(n);
  int64_t max_key = 0;
  {
    const std::vector<int64_t> cb = chunk_bounds(n, 1 << 14);
    const int64_t C = static_cast<int64_t>(cb.size()) - 1;
    std::vector<int64_t> cmax(C, 0);
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_keys", [&] {
      const index_t* kp = keys.data_ptr<index_t>();
      for_each_chunk(C, [&](int64_t c) {
        int64_t m = 0;
        for (int64_t i = cb[c]; i < cb[c + 1]; ++i) {
          const int64_t k = static_cast<int64_t>(kp[i]);
          TORCH_CHECK(k >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", k,
                      " at position ", i);
          k64[i] = k;
          m = std::max(m, k);
        }
        cmax[c] = m;
      });
    });
    for (int64_t c = 0; c < C; ++c) max_key = std::max(max_key, cmax[c]);
    AT_DISPATCH_INDEX_TYPES(group.scalar_type(), "unique_keys_per_group_group", [&] {
      const index_t* gp = group.data_ptr<index_t>();
      for_each_chunk(C, [&](int64_t c) {
        for (int64_t i = cb[c]; i < cb[c + 1]; ++i) {
          const int64_t g = static_cast<int64_t>(gp[i]);
          TORCH_CHECK(g >= 0 && g < num_groups, "torchrec_esd::", op,
                      ": group values must be in [0, num_groups = ", num_groups, "), got ", g,
                      " at position ", i);
          g64[i] = g;
        }
      });
    });
  }

  std::vector<int64_t> uk, ug, cnt;
  const int kbits = bit_width(static_cast<uint64_t>(max_key));
  const int gbits = bit_width(static_cast<uint64_t>(std::max<int64_t>(num_groups - 1, 0)));
  if (n > 0 && kbits + gbits <= 64) {
    // Fast path: radix sort of packed (group << kbits | key), then run lengths.
    std::vector<uint64_t> c(n), buf(n);
    at::parallel_for(0, n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i)
        c[i] = (kbits == 64 ? 0 : (static_cast<uint64_t>(g64[i]) << kbits)) |
               static_cast<uint64_t>(k64[i]);
    });
    radix_sort_u64(c, buf, kbits + gbits);
    const uint64_t kmask = kbits == 64 ? ~0ULL : ((1ULL << kbits) - 1);
    // run starts, counted then written per chunk
    const std::vector<int64_t> cb = chunk_bounds(n, 1 << 15);
    const int64_t C = static_cast<int64_t>(cb.size()) - 1;
    std::vector<int64_t> cstart(C + 1, 0);
    for_each_chunk(C, [&](int64_t ch) {
      int64_t m = 0;
      for (int64_t i = cb[ch]; i < cb[ch + 1]; ++i) m += (i == 0 || c[i] != c[i - 1]);
      cstart[ch + 1] = m;
    });
    for (int64_t ch = 0; ch < C; ++ch) cstart[ch + 1] += cstart[ch];
    const int64_t u = cstart[C];
    uk.resize(u), ug.resize(u), cnt.resize(u);
    std::vector<int64_t> first(u + 1);
    first[u] = n;
    for_each_chunk(C, [&](int64_t ch) {
      int64_t j = cstart[ch];
      for (int64_t i = cb[ch]; i < cb[ch + 1]; ++i) {
        if (i == 0 || c[i] != c[i - 1]) {
          uk[j] = static_cast<int64_t>(c[i] & kmask);
          ug[j] = kbits == 64 ? 0 : static_cast<int64_t>(c[i] >> kbits);
          first[j] = i;
          ++j;
        }
      }
    });
    at::parallel_for(0, u, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t j = b; j < e; ++j) cnt[j] = first[j + 1] - first[j];
    });
  } else if (n > 0) {
    // General path (keys too wide to pack with the group): sort (group, key) pairs.
    std::vector<std::pair<int64_t, int64_t>> p(n);
    for (int64_t i = 0; i < n; ++i) p[i] = {g64[i], k64[i]};
    std::sort(p.begin(), p.end());
    for (int64_t i = 0; i < n; ++i) {
      if (i == 0 || p[i] != p[i - 1]) {
        ug.push_back(p[i].first);
        uk.push_back(p[i].second);
        cnt.push_back(1);
      } else {
        ++cnt.back();
      }
    }
  }
  const int64_t u = static_cast<int64_t>(uk.size());
  at::Tensor out_k = at::empty({u}, keys.options());
  at::Tensor out_g = at::empty({u}, keys.options().dtype(at::kLong));
  at::Tensor out_c = at::empty({u}, keys.options().dtype(at::kLong));
  std::copy(ug.begin(), ug.end(), out_g.data_ptr<int64_t>());
  std::copy(cnt.begin(), cnt.end(), out_c.data_ptr<int64_t>());
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "unique_keys_per_group_out", [&] {
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
