// CUDA kernels of the id-table operators (built only when CUDA is available):
// id_table_build, id_table_lookup, sample_cost_matrix, unique_keys_per_group.
// Semantics and table layout: torchrec_esd/reference_ops.py; the results are
// identical to the CPU kernels' (the cost matrix up to float summation order).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "../esd_checks.h"
#include "../table_common.h"

namespace torchrec_esd {

namespace {

constexpr int kThreads = 256;
constexpr int64_t kScanMaxBag = 256;  // longer bags: sort-based first-occurrence mask

int grid_for(int64_t n, int per_block = kThreads) {
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, 65535)));
}

void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), "torchrec_esd::", op, ": CUDA kernel got ", name, " on ", t.device(),
              "; all tensors must be on the same device");
}

int bit_width(uint64_t v) {
  int b = 0;
  while (v) ++b, v >>= 1;
  return b;
}

// key64[i] = keys[i], home[i] = table_hash(key) & mask; flags a negative key.
template <typename index_t>
__global__ void keys_home_kernel(const index_t* __restrict__ keys, int64_t n, uint64_t mask,
                                 int64_t* __restrict__ key64, int64_t* __restrict__ home,
                                 int* __restrict__ negative) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = static_cast<int64_t>(keys[i]);
    if (k < 0) *negative = 1;
    key64[i] = k;
    home[i] = static_cast<int64_t>(table_hash(static_cast<uint64_t>(k)) & mask);
  }
}

__global__ void scatter_table_kernel(const int64_t* __restrict__ key, const int64_t* __restrict__ idx,
                                     const int64_t* __restrict__ pos, int64_t n, int64_t start,
                                     uint64_t mask, int64_t* __restrict__ slots) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t s = static_cast<uint64_t>(pos[i] + start) & mask;
    slots[2 * s] = key[i];
    slots[2 * s + 1] = idx[i];
  }
}

template <typename index_t>
__global__ void lookup_kernel(const int64_t* __restrict__ slots, uint64_t mask,
                              const index_t* __restrict__ q, int64_t n, int64_t* __restrict__ out,
                              int* __restrict__ negative) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t k = static_cast<int64_t>(q[i]);
    if (k < 0) {
      *negative = 1;
      out[i] = -1;
    } else {
      out[i] = table_probe(slots, mask, k, table_hash(static_cast<uint64_t>(k)));
    }
  }
}

struct WorkerDesc {
  const int64_t* slots;
  uint64_t mask;
  const double* weights;
  int64_t num_weights;
};

// One warp per sample: each lane takes one key of a 32-key chunk of the bag,
// keeps it only at its first occurrence in the bag (scan of the earlier keys,
// or the precomputed `first` mask when bags are long), then for every worker
// the warp sums the weights of its kept keys.
// error[0]: a negative key; error[1]: 1 + worker whose table stores an index
// beyond its weights, error[2]: that index.
template <typename index_t, typename offset_t>
__global__ void cost_kernel(const index_t* __restrict__ keys, const offset_t* __restrict__ offsets,
                            int64_t B, const bool* __restrict__ first,
                            const WorkerDesc* __restrict__ tables,
                            const double* __restrict__ miss, int64_t W, double* __restrict__ out,
                            unsigned long long* __restrict__ error) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t stride = (int64_t)gridDim.x * warps_per_block;
  for (int64_t b = blockIdx.x * warps_per_block + (threadIdx.x >> 5); b < B; b += stride) {
    const int64_t lo = static_cast<int64_t>(offsets[b]);
    const int64_t hi = static_cast<int64_t>(offsets[b + 1]);
    double* ob = out + b * W;
    for (int64_t base = lo; base < hi; base += 32) {  // uniform across the warp
      const int64_t j = base + lane;
      const bool active = j < hi;
      const int64_t k = active ? static_cast<int64_t>(keys[j]) : 0;
      bool keep = active;
      if (active && k < 0) {
        error[0] = 1ULL;
        keep = false;
      }
      if (first != nullptr) {
        keep = keep && first[j];
      } else {
        for (int64_t t = lo; keep && t < j; ++t)
          if (static_cast<int64_t>(keys[t]) == k) keep = false;
      }
      const uint64_t h = table_hash(static_cast<uint64_t>(k));
      for (int64_t w = 0; w < W; ++w) {
        double v = 0.0;
        if (keep) {
          const WorkerDesc d = tables[w];
          const int64_t idx = table_probe(d.slots, d.mask, k, h);
          if (idx < 0) {
            v = miss[w];
          } else if (idx < d.num_weights) {
            v = d.weights[idx];
          } else if (atomicCAS(&error[1], 0ULL, static_cast<unsigned long long>(w + 1)) == 0ULL) {
            error[2] = static_cast<unsigned long long>(idx);
          }
        }
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) ob[w] += v;
      }
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------

at::Tensor id_table_build_cuda(const at::Tensor& keys) {
  const char* op = "id_table_build";
  check_index_vector(op, "keys", keys);
  check_cuda(op, "keys", keys);
  c10::cuda::CUDAGuard guard(keys.device());
  const int64_t n = keys.numel();
  const int64_t cap = table_capacity(n);
  const uint64_t mask = static_cast<uint64_t>(cap - 1);
  const auto lopt = keys.options().dtype(at::kLong);
  at::Tensor slots = at::full({cap, 2}, kEmptyKey, lopt);
  if (n == 0) return slots;
  auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor key64 = at::empty({n}, lopt);
  at::Tensor home = at::empty({n}, lopt);
  at::Tensor negative = at::zeros({1}, keys.options().dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "id_table_build_cuda", [&] {
    keys_home_kernel<index_t><<<grid_for(n), kThreads, 0, stream>>>(
        keys.data_ptr<index_t>(), n, mask, key64.data_ptr<int64_t>(), home.data_ptr<int64_t>(),
        negative.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(negative.item<int>() == 0, "torchrec_esd::", op, ": keys must be non-negative");

  // Sort by key: duplicates become neighbours.
  at::Tensor sk, by_key;
  std::tie(sk, by_key) = at::sort(key64, /*stable=*/true, 0, false);
  if (n > 1) {
    at::Tensor eq = sk.slice(0, 1).eq(sk.slice(0, 0, n - 1));
    if (eq.any().item<bool>()) {
      TORCH_CHECK(false, "torchrec_esd::", op, ": keys must be unique, found duplicate key ",
                  sk.slice(0, 1).masked_select(eq).min().item<int64_t>());
    }
  }
  // First slot minimising the prefix sum of (count - 1): empty in the table.
  at::Tensor counts = at::bincount(home, {}, cap);
  const int64_t e = at::argmin(at::cumsum(counts - 1, 0)).item<int64_t>();
  const int64_t start = (e + 1) & static_cast<int64_t>(mask);
  // Order by (rotated home, key); position p_i = i + max_{j<=i}(r_j - j).
  at::Tensor r = at::bitwise_and(home - start, static_cast<int64_t>(mask));
  at::Tensor r_by_key = r.index_select(0, by_key);
  at::Tensor r_sorted, perm;
  std::tie(r_sorted, perm) = at::sort(r_by_key, /*stable=*/true, 0, false);
  at::Tensor order = by_key.index_select(0, perm);
  at::Tensor ar = at::arange(n, lopt);
  at::Tensor pos = ar + std::get<0>(at::cummax(r_sorted - ar, 0));
  at::Tensor okey = key64.index_select(0, order);
  scatter_table_kernel<<<grid_for(n), kThreads, 0, stream>>>(
      okey.data_ptr<int64_t>(), order.data_ptr<int64_t>(), pos.data_ptr<int64_t>(), n, start,
      mask, slots.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return slots;
}

at::Tensor id_table_lookup_cuda(const at::Tensor& slots, const at::Tensor& queries) {
  const char* op = "id_table_lookup";
  check_slots(op, "slots", slots);
  check_index_vector(op, "queries", queries);
  check_same_device(op, "queries", queries, "slots", slots);
  check_cuda(op, "slots", slots);
  c10::cuda::CUDAGuard guard(slots.device());
  const int64_t n = queries.numel();
  at::Tensor out = at::empty({n}, queries.options().dtype(at::kLong));
  if (n == 0) return out;
  at::Tensor negative = at::zeros({1}, queries.options().dtype(at::kInt));
  AT_DISPATCH_INDEX_TYPES(queries.scalar_type(), "id_table_lookup_cuda", [&] {
    lookup_kernel<index_t><<<grid_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        slots.data_ptr<int64_t>(), static_cast<uint64_t>(slots.size(0) - 1),
        queries.data_ptr<index_t>(), n, out.data_ptr<int64_t>(), negative.data_ptr<int>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(negative.item<int>() == 0, "torchrec_esd::", op,
              ": queries must be non-negative");
  return out;
}

at::Tensor sample_cost_matrix_cuda(const at::Tensor& keys, const at::Tensor& offsets,
                                   at::TensorList slots, at::TensorList weights,
                                   const at::Tensor& miss_weight) {
  const char* op = "sample_cost_matrix";
  check_cost_args(keys, offsets, slots, weights, miss_weight);
  check_cuda(op, "keys", keys);
  c10::cuda::CUDAGuard guard(keys.device());
  const int64_t n = keys.numel();
  const int64_t B = offsets.numel() - 1;
  const int64_t W = static_cast<int64_t>(slots.size());

  // Offsets: one synchronising copy of (offsets[0], offsets[B], any decrease,
  // longest bag).
  at::Tensor off64 = offsets.to(at::kLong);
  at::Tensor lengths = off64.slice(0, 1) - off64.slice(0, 0, B);
  at::Tensor decreasing = B > 0 ? lengths.lt(0).any().to(at::kLong) : at::zeros({}, off64.options());
  at::Tensor longest = B > 0 ? lengths.max() : at::zeros({}, off64.options());
  at::Tensor stats = at::stack({off64[0], off64[B], decreasing, longest}).cpu();
  const int64_t* st = stats.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0, "torchrec_esd::", op, ": offsets[0] must be 0, got ", st[0]);
  TORCH_CHECK(st[2] == 0, "torchrec_esd::", op, ": offsets must be non-decreasing");
  TORCH_CHECK(st[1] == n, "torchrec_esd::", op, ": offsets[-1] must equal keys.numel() = ", n,
              ", got ", st[1]);

  at::Tensor out = at::zeros({B, W}, keys.options().dtype(at::kDouble));
  if (B == 0 || W == 0) {
    TORCH_CHECK(n == 0 || keys.min().item<int64_t>() >= 0, "torchrec_esd::", op,
                ": keys must be non-negative");
    return out;
  }
  // Per-worker table descriptors, copied to the device.
  std::vector<WorkerDesc> host(W);
  for (int64_t w = 0; w < W; ++w) {
    host[w] = WorkerDesc{slots[w].data_ptr<int64_t>(),
                         static_cast<uint64_t>(slots[w].size(0) - 1),
                         weights[w].data_ptr<double>(), weights[w].numel()};
  }
  at::Tensor desc_cpu = at::empty({static_cast<int64_t>(W * sizeof(WorkerDesc))},
                                  at::TensorOptions().dtype(at::kByte));
  std::memcpy(desc_cpu.data_ptr<uint8_t>(), host.data(), W * sizeof(WorkerDesc));
  at::Tensor desc = desc_cpu.to(keys.device());
  at::Tensor error = at::zeros({3}, keys.options().dtype(at::kLong));
  // Long bags: first-occurrence mask from a sort by (sample, key) instead of
  // the kernel's quadratic scan of each bag.
  at::Tensor first;
  if (st[3] > kScanMaxBag) {
    const auto lopt = keys.options().dtype(at::kLong);
    at::Tensor k64 = keys.to(at::kLong);
    at::Tensor sample = at::repeat_interleave(at::arange(B, lopt), lengths, 0, n);
    at::Tensor order = std::get<1>(at::sort(k64, /*stable=*/true, 0, false));
    order = order.index_select(
        0, std::get<1>(at::sort(sample.index_select(0, order), /*stable=*/true, 0, false)));
    at::Tensor sk = k64.index_select(0, order);
    at::Tensor ss = sample.index_select(0, order);
    at::Tensor first_sorted = at::ones({n}, keys.options().dtype(at::kBool));
    if (n > 1) {
      first_sorted.slice(0, 1).copy_(at::logical_or(sk.slice(0, 1).ne(sk.slice(0, 0, n - 1)),
                                                    ss.slice(0, 1).ne(ss.slice(0, 0, n - 1))));
    }
    first = at::empty({n}, keys.options().dtype(at::kBool));
    first.index_copy_(0, order, first_sorted);
  }

  const int warps_per_block = kThreads / 32;
  AT_DISPATCH_INDEX_TYPES(offsets.scalar_type(), "sample_cost_matrix_cuda_offsets", [&] {
    using offset_t = index_t;
    const offset_t* off = offsets.data_ptr<offset_t>();
    AT_DISPATCH_INDEX_TYPES(keys.scalar_type(), "sample_cost_matrix_cuda_keys", [&] {
      cost_kernel<index_t, offset_t>
          <<<grid_for(B, warps_per_block), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              keys.data_ptr<index_t>(), off, B, first.defined() ? first.data_ptr<bool>() : nullptr,
              reinterpret_cast<const WorkerDesc*>(desc.data_ptr<uint8_t>()),
              miss_weight.data_ptr<double>(), W, out.data_ptr<double>(),
              reinterpret_cast<unsigned long long*>(error.data_ptr<int64_t>()));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor err = error.cpu();
  const int64_t* e = err.data_ptr<int64_t>();
  TORCH_CHECK(e[0] == 0, "torchrec_esd::", op, ": keys must be non-negative");
  if (e[1] != 0) {
    const int64_t w = e[1] - 1;
    TORCH_CHECK(false, "torchrec_esd::", op, ": table slots[", w, "] stores index ", e[2],
                " but weights[", w, "] has only ", weights[w].numel(), " entries");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unique_keys_per_group_cuda(
    const at::Tensor& keys, const at::Tensor& group, int64_t num_groups) {
  const char* op = "unique_keys_per_group";
  check_unique_args(keys, group, num_groups);
  check_cuda(op, "keys", keys);
  c10::cuda::CUDAGuard guard(keys.device());
  const int64_t n = keys.numel();
  const auto lopt = keys.options().dtype(at::kLong);
  if (n == 0) {
    return {at::empty({0}, keys.options()), at::empty({0}, lopt), at::empty({0}, lopt)};
  }
  at::Tensor k64 = keys.to(at::kLong);
  at::Tensor g64 = group.to(at::kLong);
  at::Tensor stats = at::stack({k64.min(), k64.max(), g64.min(), g64.max()}).cpu();
  const int64_t* st = stats.data_ptr<int64_t>();
  TORCH_CHECK(st[0] >= 0, "torchrec_esd::", op, ": keys must be non-negative, got ", st[0]);
  TORCH_CHECK(st[2] >= 0 && st[3] < num_groups, "torchrec_esd::", op,
              ": group values must be in [0, num_groups = ", num_groups, "), got ",
              st[2] < 0 ? st[2] : st[3]);
  const int kbits = bit_width(static_cast<uint64_t>(st[1]));
  const int gbits = bit_width(static_cast<uint64_t>(std::max<int64_t>(num_groups - 1, 0)));
  at::Tensor uk, ug, cnt;
  if (kbits + gbits <= 63) {
    // (group << kbits | key) fits a non-negative int64: one sort, run lengths.
    at::Tensor c = at::bitwise_or(at::bitwise_left_shift(g64, kbits), k64);
    at::Tensor sorted = std::get<0>(at::sort(c, /*stable=*/false, 0, false));
    at::Tensor u;
    std::tie(u, std::ignore, cnt) = at::unique_consecutive(sorted, false, true);
    const int64_t kmask = kbits == 63 ? INT64_MAX : ((int64_t{1} << kbits) - 1);
    uk = at::bitwise_and(u, kmask);
    ug = at::bitwise_right_shift(u, kbits);
  } else {
    // Keys too wide: sort by key, then stably by group.
    at::Tensor order = std::get<1>(at::sort(k64, /*stable=*/true, 0, false));
    at::Tensor perm = std::get<1>(at::sort(g64.index_select(0, order), /*stable=*/true, 0, false));
    order = order.index_select(0, perm);
    at::Tensor sk = k64.index_select(0, order);
    at::Tensor sg = g64.index_select(0, order);
    at::Tensor is_new = at::ones({n}, keys.options().dtype(at::kBool));
    if (n > 1) {
      is_new.slice(0, 1).copy_(at::logical_or(sk.slice(0, 1).ne(sk.slice(0, 0, n - 1)),
                                              sg.slice(0, 1).ne(sg.slice(0, 0, n - 1))));
    }
    at::Tensor starts = at::nonzero(is_new).flatten();
    at::Tensor ends = at::cat({starts.slice(0, 1), at::full({1}, n, lopt)});
    uk = sk.index_select(0, starts);
    ug = sg.index_select(0, starts);
    cnt = ends - starts;
  }
  return {uk.to(keys.scalar_type()), ug, cnt};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CUDA, m) {
  m.impl("id_table_build", &id_table_build_cuda);
  m.impl("id_table_lookup", &id_table_lookup_cuda);
  m.impl("sample_cost_matrix", &sample_cost_matrix_cuda);
  m.impl("unique_keys_per_group", &unique_keys_per_group_cuda);
}

}  // namespace torchrec_esd
