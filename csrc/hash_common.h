// Hash function shared by the CPU and CUDA kernels (host and device).
#pragma once
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

}  // namespace torchrec_esd
