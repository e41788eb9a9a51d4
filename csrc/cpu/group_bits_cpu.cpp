// group_price_bits: the grouped dispatcher's stage-1 [B, G] price of a batch slice
// (torchrec_esd.cost.group_inputs.group_matrix_from_bits) in one pass, from the slice's
// sample-major row keys and the holder index's group bits (an id table: row key ->
// held groups in bits 0-30 | fresh groups in bits 31-61; absent: held nowhere).
//
// Per distinct key x of the slice (t its table, u its use count: the samples that have it):
//   c_g = fresh in g ? 0 : (held in g ? rt[t, g] : rt[t, g] + ev[t, g])
//   price_g = u == 1 ? c_g : c_g / (1 + (u - 1) per_g / max(1, B - 1))
// and a sample's price sums its distinct keys' in ascending key order from 0, which is
// group_price's order on GroupInputs' pairs, so the result equals GroupInputs.group_matrix
// bit for bit (tests/test_dispatch.py).  O(N log L + U G + P G) for N keys, L the longest
// sample, U distinct keys and P distinct (sample, key) pairs; nothing per cached copy.
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "../esd_checks.h"
#include "../table_common.h"

namespace torchrec_esd {

at::Tensor group_price_bits_cpu(const at::Tensor& keys, const at::Tensor& offsets, const at::Tensor& bits_table,
                                const at::Tensor& row_offset, const at::Tensor& row_time,
                                const at::Tensor& evict_time, const at::Tensor& per) {
  const char* name = "group_price_bits";
  const char* op = "torchrec_esd::group_price_bits: ";
  check_cpu_tensor(name, "keys", keys, at::kLong, 1);
  check_cpu_tensor(name, "offsets", offsets, at::kLong, 1);
  check_cpu_tensor(name, "row_offset", row_offset, at::kLong, 1);
  check_cpu_tensor(name, "bits_table", bits_table, at::kLong, 2);
  check_slots(name, "bits_table", bits_table);
  check_cpu_tensor(name, "per", per, at::kDouble, 1);
  check_cpu_tensor(name, "row_time", row_time, at::kDouble, 2);
  check_cpu_tensor(name, "evict_time", evict_time, at::kDouble, 2);
  const int64_t G = per.numel();
  TORCH_CHECK(G <= 31, op, "at most 31 groups, got ", G);
  TORCH_CHECK(row_time.size(1) == G && evict_time.size(1) == G, op,
              "row_time and evict_time must be [T, G] matrices, G = ", G);
  const int64_t T = row_time.size(0);
  TORCH_CHECK(evict_time.size(0) == T && row_offset.numel() == T + 1, op,
              "row_time, evict_time and row_offset must have the same ", T, " tables");
  const int64_t B = offsets.numel() - 1, N = keys.numel();
  TORCH_CHECK(B >= 0, op, "offsets must have at least one entry");
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t* ro = row_offset.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[B] == N, op, "offsets must run from 0 to the ", N, " keys");
  const int64_t rows = ro[T];
  // 1. every sample's distinct keys, ascending (the pairs, sample by sample)
  std::vector<int64_t> pk;
  pk.reserve(static_cast<size_t>(N));
  std::vector<int64_t> ptr(static_cast<size_t>(B) + 1, 0);
  for (int64_t s = 0; s < B; ++s) {
    TORCH_CHECK(off[s + 1] >= off[s], op, "offsets must not decrease");
    const size_t start = pk.size();
    for (int64_t i = off[s]; i < off[s + 1]; ++i) {
      TORCH_CHECK(k[i] >= 0 && k[i] < rows, op, "key ", k[i], " outside the tables' ", rows, " rows");
      pk.push_back(k[i]);
    }
    std::sort(pk.begin() + start, pk.end());
    pk.erase(std::unique(pk.begin() + start, pk.end()), pk.end());
    ptr[s + 1] = static_cast<int64_t>(pk.size());
  }
  const int64_t P = static_cast<int64_t>(pk.size());
  // 2. the distinct keys (a local id table), their use counts
  uint64_t cap = 2;
  while (cap < 2 * static_cast<uint64_t>(std::max<int64_t>(P, 1))) cap <<= 1;
  const uint64_t lmask = cap - 1;
  std::vector<int64_t> local(2 * cap, kEmptyKey);
  std::vector<int64_t> pl(static_cast<size_t>(P)), ukey;
  std::vector<double> uses;
  for (int64_t i = 0; i < P; ++i) {
    uint64_t h = table_hash(static_cast<uint64_t>(pk[i])) & lmask;
    while (local[2 * h] != kEmptyKey && local[2 * h] != pk[i]) h = (h + 1) & lmask;
    if (local[2 * h] == kEmptyKey) {
      local[2 * h] = pk[i];
      local[2 * h + 1] = static_cast<int64_t>(ukey.size());
      ukey.push_back(pk[i]);
      uses.push_back(0.0);
    }
    pl[i] = local[2 * h + 1];
    uses[pl[i]] += 1.0;
  }
  // 3. every distinct key's price on every group
  const int64_t U = static_cast<int64_t>(ukey.size());
  const int64_t* tab = bits_table.data_ptr<int64_t>();
  const uint64_t mask = static_cast<uint64_t>(bits_table.size(0) - 1);
  const double* rt = row_time.data_ptr<double>();
  const double* ev = evict_time.data_ptr<double>();
  const double* pg = per.data_ptr<double>();
  const double den = static_cast<double>(std::max<int64_t>(1, B - 1));
  std::vector<double> cost(static_cast<size_t>(U * G));
  // the bits table is as large as the index (a row per global slot, random rows): fetch the
  // home row of the key kAhead ahead
  constexpr int64_t kAhead = 16;
  for (int64_t x = 0; x < std::min(U, kAhead); ++x)
    __builtin_prefetch(tab + 2 * (table_hash(static_cast<uint64_t>(ukey[x])) & mask));
  for (int64_t x = 0; x < U; ++x) {
    if (x + kAhead < U) __builtin_prefetch(tab + 2 * (table_hash(static_cast<uint64_t>(ukey[x + kAhead])) & mask));
    const int64_t t = static_cast<int64_t>(std::upper_bound(ro, ro + T + 1, ukey[x]) - ro) - 1;
    const int64_t v = std::max<int64_t>(table_probe(tab, mask, ukey[x], table_hash(static_cast<uint64_t>(ukey[x]))), 0);
    const double us = uses[x];
    for (int64_t g = 0; g < G; ++g) {
      const bool held = (v >> g) & 1, fresh = (v >> (31 + g)) & 1;
      const double r = rt[t * G + g];
      const double c = fresh ? 0.0 : (held ? r : r + ev[t * G + g]);
      cost[x * G + g] = us == 1.0 ? c : c / (1.0 + ((us - 1.0) * pg[g]) / den);
    }
  }
  // 4. every sample sums its keys' prices in ascending key order
  auto out = at::zeros({B, G}, row_time.options());
  double* o = out.data_ptr<double>();
  for (int64_t s = 0; s < B; ++s) {
    double* dst = o + s * G;
    for (int64_t i = ptr[s]; i < ptr[s + 1]; ++i) {
      const double* row = cost.data() + pl[i] * G;
      for (int64_t g = 0; g < G; ++g) dst[g] += row[g];
    }
  }
  return out;
}

// group_bits_assign: HolderIndex._assign in one pass.  From every cached copy of `keys` (pos:
// the key's index; worker; outdated; dirty) and each worker's list (list_of [W]: its group, or
// num_groups for none), store per key in `bits_table` the groups holding it (bits 0-30) and those
// holding it fresh (bits 31-61), or erase it where no group holds it, and in `owner_table` the
// lowest worker holding it dirty, or erase it.  O(U + H) expected, in place.
void group_bits_assign_cpu(at::Tensor bits_table, at::Tensor owner_table, const at::Tensor& keys,
                           const at::Tensor& pos, const at::Tensor& worker, const at::Tensor& outdated,
                           const at::Tensor& dirty, const at::Tensor& list_of, int64_t num_groups) {
  const char* name = "group_bits_assign";
  const char* op = "torchrec_esd::group_bits_assign: ";
  check_cpu_tensor(name, "bits_table", bits_table, at::kLong, 2);
  check_slots(name, "bits_table", bits_table);
  check_cpu_tensor(name, "owner_table", owner_table, at::kLong, 2);
  check_slots(name, "owner_table", owner_table);
  check_cpu_tensor(name, "keys", keys, at::kLong, 1);
  check_cpu_tensor(name, "pos", pos, at::kLong, 1);
  check_cpu_tensor(name, "worker", worker, at::kLong, 1);
  check_cpu_tensor(name, "list_of", list_of, at::kLong, 1);
  check_cpu_tensor(name, "outdated", outdated, at::kBool, 1);
  check_cpu_tensor(name, "dirty", dirty, at::kBool, 1);
  const int64_t U = keys.numel(), H = pos.numel(), W = list_of.numel();
  TORCH_CHECK(worker.numel() == H && outdated.numel() == H && dirty.numel() == H, op,
              "pos, worker, outdated and dirty must have one entry per copy");
  TORCH_CHECK(num_groups >= 0 && num_groups <= 31, op, "num_groups must be in [0, 31], got ", num_groups);
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* w = worker.data_ptr<int64_t>();
  const int64_t* lo = list_of.data_ptr<int64_t>();
  const bool* od = outdated.data_ptr<bool>();
  const bool* dt = dirty.data_ptr<bool>();
  std::vector<int64_t> held(static_cast<size_t>(U), 0), fresh(static_cast<size_t>(U), 0), owner(static_cast<size_t>(U), W);
  for (int64_t i = 0; i < H; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < U && w[i] >= 0 && w[i] < W, op, "copy ", i, " names key ", p[i], " / worker ",
                w[i], " outside [0, ", U, ") x [0, ", W, ")");
    const int64_t l = lo[w[i]];
    if (l >= 0 && l < num_groups) {
      held[p[i]] |= int64_t{1} << l;
      if (!od[i]) fresh[p[i]] |= int64_t{1} << l;
    }
    if (dt[i]) owner[p[i]] = std::min(owner[p[i]], w[i]);
  }
  int64_t* bt = bits_table.data_ptr<int64_t>();
  int64_t* ot = owner_table.data_ptr<int64_t>();
  const uint64_t bmask = static_cast<uint64_t>(bits_table.size(0) - 1);
  const uint64_t omask = static_cast<uint64_t>(owner_table.size(0) - 1);
  for (int64_t x = 0; x < U; ++x) {
    TORCH_CHECK(k[x] >= 0, op, "keys must be non-negative, got ", k[x]);
    if (held[x]) {
      TORCH_CHECK(table_insert(bt, bmask, k[x], held[x] | (fresh[x] << 31)), op, "the bits table is full");
    } else {
      table_erase(bt, bmask, k[x]);
    }
    if (owner[x] < W) {
      TORCH_CHECK(table_insert(ot, omask, k[x], owner[x]), op, "the owner table is full");
    } else {
      table_erase(ot, omask, k[x]);
    }
  }
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("group_price_bits", &group_price_bits_cpu);
  m.impl("group_bits_assign", &group_bits_assign_cpu);
}

}  // namespace torchrec_esd
