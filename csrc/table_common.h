// Open-addressing id table shared by the CPU and CUDA kernels (host and device).
//
// A table is an int64 [cap, 2] tensor, cap a power of two; row = (key, index),
// empty rows (-1, -1).  Key k's home slot is hash_feature_id(k, 0) & (cap - 1)
// and it sits at the first slot reached by linear probing from there without
// crossing an empty row (see torchrec_esd/reference_ops.py for the layout).
#pragma once
#include <cstdint>

#include "hash_common.h"

namespace torchrec_esd {

constexpr int64_t kEmptyKey = -1;

ESD_HOST_DEVICE uint64_t table_hash(uint64_t key) { return hash_feature_id(key, 0); }

// Index stored with `key` (hash h = table_hash(key)), or -1 when absent.  Probes
// at most cap slots so that even a malformed (full) table cannot loop forever.
ESD_HOST_DEVICE int64_t table_probe(const int64_t* slots, uint64_t mask, int64_t key,
                                    uint64_t h) {
  uint64_t s = h & mask;
  for (uint64_t step = 0; step <= mask; ++step) {
    const int64_t k = slots[2 * s];
    if (k == key) return slots[2 * s + 1];
    if (k == kEmptyKey) return -1;
    s = (s + 1) & mask;
  }
  return -1;
}

// Number of rows of the table built for n keys: next power of two >= max(2, 2n).
inline int64_t table_capacity(int64_t n) {
  int64_t cap = 2;
  while (cap < 2 * n) cap <<= 1;
  return cap;
}

}  // namespace torchrec_esd
