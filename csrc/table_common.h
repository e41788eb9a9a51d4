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

// Puts (key, value) into the table (overwriting the value of a present key);
// false (nothing written) when the table is full.
ESD_HOST_DEVICE bool table_insert(int64_t* slots, uint64_t mask, int64_t key, int64_t value) {
  uint64_t s = table_hash(static_cast<uint64_t>(key)) & mask;
  for (uint64_t step = 0; step <= mask; ++step) {
    if (slots[2 * s] == kEmptyKey || slots[2 * s] == key) {
      slots[2 * s] = key;
      slots[2 * s + 1] = value;
      return true;
    }
    s = (s + 1) & mask;
  }
  return false;
}

// Removes `key` (absent: no-op) by backward-shift deletion: every later row of
// its cluster whose home is not cyclically in (hole, row] moves into the hole,
// so the "no empty row between home and key" invariant holds without tombstones.
ESD_HOST_DEVICE void table_erase(int64_t* slots, uint64_t mask, int64_t key) {
  uint64_t i = table_hash(static_cast<uint64_t>(key)) & mask;
  for (uint64_t step = 0;; ++step) {
    if (step > mask || slots[2 * i] == kEmptyKey) return;
    if (slots[2 * i] == key) break;
    i = (i + 1) & mask;
  }
  uint64_t j = i;
  for (;;) {
    j = (j + 1) & mask;
    const int64_t k = slots[2 * j];
    if (k == kEmptyKey) break;
    const uint64_t home = table_hash(static_cast<uint64_t>(k)) & mask;
    // the row at j may move to i iff its home is not in the cyclic range (i, j]
    const bool stays = (i < j) ? (home > i && home <= j) : (home > i || home <= j);
    if (!stays) {
      slots[2 * i] = k;
      slots[2 * i + 1] = slots[2 * j + 1];
      i = j;
    }
  }
  slots[2 * i] = kEmptyKey;
  slots[2 * i + 1] = kEmptyKey;
}

// Number of rows of the table built for n keys: next power of two >= max(2, 2n).
inline int64_t table_capacity(int64_t n) {
  int64_t cap = 2;
  while (cap < 2 * n) cap <<= 1;
  return cap;
}

}  // namespace torchrec_esd
