// Hash function shared by the CPU and CUDA kernels (host and device).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#if defined(__CUDACC__)
#define ESD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ESD_HOST_DEVICE inline
#endif

namespace torchrec_esd {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

// splitmix64 finaliser of the id xor-ed with a per-feature salt.
ESD_HOST_DEVICE uint64_t hash_feature_id(uint64_t id, uint64_t feature) {
  uint64_t z = id ^ (feature * kGolden);
  z += kGolden;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

ESD_HOST_DEVICE int64_t hash_to_output(uint64_t key, uint64_t num_buckets) {
  return num_buckets == 0 ? static_cast<int64_t>(key)
                          : static_cast<int64_t>(key % num_buckets);
}

// Argument checks of torchrec_esd::hash_ids, shared by every kernel (host side).
inline void check_hash_ids_args(const at::Tensor& ids, int64_t feature, int64_t num_buckets) {
  TORCH_CHECK(ids.scalar_type() == at::kLong || ids.scalar_type() == at::kInt,
              "torchrec_esd::hash_ids: ids must be int32 or int64, got ", ids.scalar_type());
  TORCH_CHECK(ids.dim() == 1, "torchrec_esd::hash_ids: ids must be 1-D, got ", ids.dim(), "-D");
  TORCH_CHECK(feature >= 0, "torchrec_esd::hash_ids: feature must be >= 0, got ", feature);
  TORCH_CHECK(num_buckets >= 0, "torchrec_esd::hash_ids: num_buckets must be >= 0, got ",
              num_buckets);
}

}  // namespace torchrec_esd
