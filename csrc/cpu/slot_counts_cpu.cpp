// CPU kernel of slot_table_counts: a worker's occupied and dirty cache slots per
// table in one pass (torchrec_esd.cache.slots.WorkerSlots.per_table, two
// running counts over all slots, is the reference the tests compare it to).
// The dispatcher's directory reads them before every full decision, for every
// worker whose slots changed (torchrec_esd.cache.holders.HolderIndex.occupancy).
#include <torch/library.h>
#include <torch/types.h>

#include <tuple>

#include "../esd_checks.h"

namespace torchrec_esd {

std::tuple<at::Tensor, at::Tensor> slot_table_counts_cpu(const at::Tensor& keys, const at::Tensor& dirty,
                                                         const at::Tensor& table_start) {
  const char* op = "slot_table_counts";
  check_cpu_tensor(op, "keys", keys, at::kLong, 1);
  check_cpu_tensor(op, "dirty", dirty, at::kBool, 1);
  check_cpu_tensor(op, "table_start", table_start, at::kLong, 1);
  const int64_t S = keys.numel(), T = table_start.numel() - 1;
  TORCH_CHECK(dirty.numel() == S, "torchrec_esd::", op, ": dirty must have one flag per slot (", S, "), got ",
              dirty.numel());
  TORCH_CHECK(T >= 0, "torchrec_esd::", op, ": table_start must hold at least one entry");
  const int64_t* ts = table_start.data_ptr<int64_t>();
  TORCH_CHECK(ts[0] == 0 && ts[T] == S, "torchrec_esd::", op, ": table_start must run from 0 to the ", S,
              " slots, got ", ts[0], " to ", ts[T]);
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(ts[t] <= ts[t + 1], "torchrec_esd::", op, ": table_start must not decrease (table ", t, ")");
  auto occupied = at::zeros({T}, at::TensorOptions().dtype(at::kLong));
  auto ndirty = at::zeros({T}, at::TensorOptions().dtype(at::kLong));
  const int64_t* k = keys.data_ptr<int64_t>();
  const bool* d = dirty.data_ptr<bool>();
  int64_t* occ = occupied.data_ptr<int64_t>();
  int64_t* nd = ndirty.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    int64_t o = 0, n = 0;
    for (int64_t s = ts[t]; s < ts[t + 1]; ++s) {
      o += k[s] >= 0;
      n += d[s];
    }
    occ[t] = o;
    nd[t] = n;
  }
  return {occupied, ndirty};
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("slot_table_counts", &slot_table_counts_cpu); }

}  // namespace torchrec_esd
