// CPU kernel of plan_worker_cache: one worker's cache step of one iteration
// (semantics: CacheDirectory._plan_worker in torchrec_esd/cache/directory.py,
// the pure-PyTorch reference the tests compare this kernel to).
//
// `policy` is the eviction order, a torchrec_esd.cache.policy.KernelPolicy
// value (mirrored by EvictionOrder below); a policy without a code runs on the
// reference path only.
//
// Step A (a dirty copy another worker uses is pushed) is part of it:
// `user_keys` (ascending, distinct) are the rows used this iteration and
// `user_counts` how many workers use each; a row absent from them has no user.
// They must cover at least this worker's keys and the rows of its cache that
// other workers use.
//
// The cache state is mutated in place: slot_keys / last_use / freq / lag /
// dirty per slot (lag: versions the cached copy is behind the latest), and
// slot_map, either dense (int32 [rows], the slot of every row key, -1 absent)
// or hashed (int64 [cap, 2] open-addressing table of table_common.h, row =
// (key, slot); memory O(slots) instead of O(rows)).  Slots are table-major: table t owns
// slots [table_start[t], table_start[t+1]).  `keys` are the distinct row keys
// the worker's samples use, ascending (so table-major too).
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "../table_common.h"

namespace torchrec_esd {

namespace {

constexpr const char* kOp = "plan_worker_cache";

void check_vec(const char* name, const at::Tensor& t, at::ScalarType type, int64_t n = -1) {
  TORCH_CHECK(t.device().is_cpu(), "torchrec_esd::", kOp, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == type, "torchrec_esd::", kOp, ": ", name, " must be ", type,
              ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "torchrec_esd::", kOp, ": ", name,
              " must be a contiguous 1-D tensor");
  TORCH_CHECK(n < 0 || t.numel() == n, "torchrec_esd::", kOp, ": ", name, " must have ", n,
              " entries, got ", t.numel());
}

// torchrec_esd.cache.policy.KernelPolicy
enum class EvictionOrder : int64_t { kLru = 0, kLfu = 1 };

// eviction priority of a slot: the lowest is evicted first (ties: lowest slot)
int64_t eviction_priority(EvictionOrder order, int64_t last_use, int64_t freq) {
  switch (order) {
    case EvictionOrder::kLfu:
      return freq * (int64_t(1) << 32) + last_use;
    case EvictionOrder::kLru:
    default:
      return last_use;
  }
}

at::Tensor to_tensor(const std::vector<int64_t>& v) {
  auto out = at::empty({static_cast<int64_t>(v.size())}, at::TensorOptions().dtype(at::kLong));
  std::copy(v.begin(), v.end(), out.data_ptr<int64_t>());
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
plan_worker_cache_cpu(at::Tensor slot_keys, at::Tensor last_use, at::Tensor freq, at::Tensor lag,
                      at::Tensor dirty, at::Tensor slot_map, const at::Tensor& table_start,
                      const at::Tensor& user_keys, const at::Tensor& user_counts,
                      const at::Tensor& keys, const at::Tensor& row_offset, int64_t iteration,
                      int64_t staleness, int64_t policy, const std::optional<at::Tensor>& user_table) {
  const int64_t S = slot_keys.numel();
  check_vec("slot_keys", slot_keys, at::kLong);
  check_vec("last_use", last_use, at::kLong, S);
  check_vec("freq", freq, at::kLong, S);
  check_vec("lag", lag, at::kLong, S);
  check_vec("dirty", dirty, at::kBool, S);
  check_vec("row_offset", row_offset, at::kLong);
  const int64_t T = row_offset.numel() - 1;
  TORCH_CHECK(T >= 1, "torchrec_esd::", kOp, ": row_offset needs T+1 >= 2 entries");
  check_vec("table_start", table_start, at::kLong, T + 1);
  const int64_t* ro = row_offset.data_ptr<int64_t>();
  const int64_t* ts = table_start.data_ptr<int64_t>();
  const int64_t R = ro[T];
  TORCH_CHECK(ts[0] == 0 && ts[T] == S, "torchrec_esd::", kOp,
              ": table_start must run from 0 to the number of slots (", S, ")");
  const bool dense = slot_map.dim() == 1;
  if (dense) {
    check_vec("slot_map", slot_map, at::kInt, R);
  } else {
    const int64_t cap = slot_map.dim() == 2 ? slot_map.size(0) : 0;
    TORCH_CHECK(slot_map.device().is_cpu() && slot_map.scalar_type() == at::kLong &&
                    slot_map.dim() == 2 && slot_map.size(1) == 2 && slot_map.is_contiguous() &&
                    cap >= 2 && (cap & (cap - 1)) == 0 && cap >= 2 * S,
                "torchrec_esd::", kOp, ": slot_map must be dense (int32 [rows]) or a contiguous "
                "int64 [cap, 2] hash table, cap a power of two >= 2 * slots");
  }
  check_vec("user_keys", user_keys, at::kLong);
  check_vec("user_counts", user_counts, at::kLong, user_keys.numel());
  check_vec("keys", keys, at::kLong);
  TORCH_CHECK(staleness >= 0, "torchrec_esd::", kOp, ": staleness must be >= 0");
  TORCH_CHECK(policy == static_cast<int64_t>(EvictionOrder::kLru) ||
                  policy == static_cast<int64_t>(EvictionOrder::kLfu),
              "torchrec_esd::", kOp, ": unknown eviction policy code ", policy,
              " (0: LRU, 1: LFU; other policies run on the reference path)");
  const auto order = static_cast<EvictionOrder>(policy);

  int64_t* sk = slot_keys.data_ptr<int64_t>();
  int64_t* lu = last_use.data_ptr<int64_t>();
  int64_t* fq = freq.data_ptr<int64_t>();
  int64_t* lg = lag.data_ptr<int64_t>();
  bool* dt = dirty.data_ptr<bool>();
  int32_t* sm = dense ? slot_map.data_ptr<int32_t>() : nullptr;
  int64_t* hm = dense ? nullptr : slot_map.data_ptr<int64_t>();
  const uint64_t hmask = dense ? 0 : static_cast<uint64_t>(slot_map.size(0) - 1);
  auto find_slot = [&](int64_t key) -> int64_t {
    return dense ? sm[key] : table_probe(hm, hmask, key, table_hash(static_cast<uint64_t>(key)));
  };
  auto map_erase = [&](int64_t key) {
    if (dense) sm[key] = -1; else table_erase(hm, hmask, key);
  };
  auto map_set = [&](int64_t key, int64_t s) {
    if (dense) {
      sm[key] = static_cast<int32_t>(s);
    } else {
      TORCH_CHECK(table_insert(hm, hmask, key, s), "torchrec_esd::", kOp, ": the slot map is full");
    }
  };
  const int64_t NU = user_keys.numel();
  const int64_t* uk = user_keys.data_ptr<int64_t>();
  const int64_t* uc = user_counts.data_ptr<int64_t>();
  // the users of a row: by probing user_table (an id table of user_keys built once by a
  // caller that steps many workers on the same rows: O(1), no O(NU) order check per
  // worker) or by a binary search in user_keys (checked ascending, one branch-free pass)
  const int64_t* ut = nullptr;
  uint64_t umask = 0;
  if (user_table.has_value() && user_table->defined()) {
    const at::Tensor& tb = *user_table;
    TORCH_CHECK(tb.device().is_cpu() && tb.scalar_type() == at::kLong && tb.dim() == 2 &&
                    tb.size(1) == 2 && tb.is_contiguous() && tb.size(0) >= 2 &&
                    (tb.size(0) & (tb.size(0) - 1)) == 0,
                "torchrec_esd::", kOp, ": user_table must be an id table of user_keys (contiguous "
                "CPU int64 [cap, 2], cap a power of two; id_table_build)");
    ut = tb.data_ptr<int64_t>();
    umask = static_cast<uint64_t>(tb.size(0) - 1);
  } else {
    bool ascending = true;
    for (int64_t i = 1; i < NU; ++i) ascending &= uk[i] > uk[i - 1];
    TORCH_CHECK(ascending, "torchrec_esd::", kOp, ": user_keys must be distinct and ascending");
  }
  auto users_of = [&](int64_t key) -> int64_t {
    if (ut != nullptr) {
      const int64_t i = table_probe(ut, umask, key, table_hash(static_cast<uint64_t>(key)));
      if (i < 0) return 0;
      TORCH_CHECK(i < NU && uk[i] == key, "torchrec_esd::", kOp,
                  ": user_table does not map user_keys to their positions");
      return uc[i];
    }
    const int64_t* p = std::lower_bound(uk, uk + NU, key);
    return (p != uk + NU && *p == key) ? uc[p - uk] : 0;
  };
  const int64_t* k = keys.data_ptr<int64_t>();
  const int64_t U = keys.numel();
  for (int64_t i = 0; i < U; ++i) {
    TORCH_CHECK(k[i] >= 0 && k[i] < R, "torchrec_esd::", kOp, ": key ", k[i], " outside [0, ", R,
                ")");
    TORCH_CHECK(i == 0 || k[i] > k[i - 1], "torchrec_esd::", kOp,
                ": keys must be distinct and ascending");
  }

  // step A: a dirty copy that another worker uses this iteration is pushed (slot order).
  // Either look the batch's rows (user_keys) up in the slot map, O(NU (log U + 1)),
  // or scan this worker's slots for dirty ones and look their keys up in user_keys,
  // O(S + D log NU) for D dirty slots; whichever visits fewer entries (the batch's
  // rows of ALL workers outnumber one worker's slots at large W: at W = 256, 13
  // tables and 64 samples per worker, ~1e5 rows against 16384 slots).  Both find
  // the same (slot, key) pairs; sorted by slot.
  std::vector<int64_t> push_keys, push_slots;
  {
    std::vector<std::pair<int64_t, int64_t>> shared;  // (slot, key)
    if (NU <= S) {
      for (int64_t i = 0; i < NU; ++i) {
        const int64_t key = uk[i];
        if (key < 0 || key >= R) continue;  // not a row: never cached
        const bool mine = std::binary_search(k, k + U, key);
        if (uc[i] - (mine ? 1 : 0) <= 0) continue;
        const int64_t s = find_slot(key);
        if (s >= 0 && dt[s]) shared.emplace_back(s, key);
      }
    } else {
      for (int64_t s = 0; s < S; ++s) {
        if (!dt[s] || sk[s] < 0) continue;
        const int64_t key = sk[s];
        const bool mine = std::binary_search(k, k + U, key);
        if (users_of(key) - (mine ? 1 : 0) > 0) shared.emplace_back(s, key);
      }
    }
    std::sort(shared.begin(), shared.end());
    push_keys.reserve(shared.size());
    push_slots.reserve(shared.size());
    for (const auto& p : shared) {
      push_keys.push_back(p.second);
      push_slots.push_back(p.first);
      dt[p.first] = false;
    }
  }
  const auto n_shared = static_cast<int64_t>(push_keys.size());

  // lookups: present / usable / current, and the table of every key
  std::vector<int64_t> slot(U), table(U);
  std::vector<char> miss(U), update(U), current(U);
  std::vector<int64_t> n_miss(T, 0);
  int64_t t = 0;
  for (int64_t i = 0; i < U; ++i) {
    const int64_t key = k[i];
    while (key >= ro[t + 1]) ++t;
    table[i] = t;
    const int64_t s = find_slot(key);
    slot[i] = s;
    const bool present = s >= 0;
    const int64_t behind = present ? lg[s] : 0;
    current[i] = present && behind == 0;
    miss[i] = !present;
    update[i] = present && behind > staleness;
    if (!present) ++n_miss[t];
  }

  // evict: per table, the `need` unpinned cached slots first by (priority, slot)
  std::vector<int64_t> need(T, 0);
  bool any_need = false;
  for (int64_t tb = 0; tb < T; ++tb) {
    if (n_miss[tb] == 0) continue;
    int64_t n_free = 0;
    for (int64_t s = ts[tb]; s < ts[tb + 1]; ++s) n_free += sk[s] < 0;
    need[tb] = std::max<int64_t>(n_miss[tb] - n_free, 0);
    any_need = any_need || need[tb] > 0;
  }
  if (any_need) {
    std::vector<char> pinned(S, 0);
    for (int64_t i = 0; i < U; ++i)
      if (slot[i] >= 0) pinned[slot[i]] = 1;
    std::vector<std::pair<int64_t, int64_t>> cand;
    for (int64_t tb = 0; tb < T; ++tb) {
      if (need[tb] == 0) continue;
      cand.clear();
      for (int64_t s = ts[tb]; s < ts[tb + 1]; ++s) {
        if (sk[s] < 0 || pinned[s]) continue;
        cand.emplace_back(eviction_priority(order, lu[s], fq[s]), s);
      }
      const auto m = static_cast<int64_t>(std::min<size_t>(need[tb], cand.size()));
      std::partial_sort(cand.begin(), cand.begin() + m, cand.end());
      for (int64_t j = 0; j < m; ++j) {
        const int64_t v = cand[j].second;
        if (dt[v]) {  // miss-push of an evicted dirty row
          push_keys.push_back(sk[v]);
          push_slots.push_back(v);
        }
        map_erase(sk[v]);
        sk[v] = -1;
        dt[v] = false;
        fq[v] = 0;
      }
    }
  }

  // the r-th miss of a table goes to the r-th free slot of the table (ascending)
  int64_t i = 0;
  while (i < U) {
    const int64_t tb = table[i];
    int64_t end = i;
    while (end < U && table[end] == tb) ++end;
    if (n_miss[tb] > 0) {
      int64_t s = ts[tb];
      for (int64_t j = i; j < end; ++j) {
        if (!miss[j]) continue;
        while (s < ts[tb + 1] && sk[s] >= 0) ++s;
        if (s == ts[tb + 1]) break;  // table full: the remaining misses stay transient
        slot[j] = s;
        sk[s] = k[j];
        map_set(k[j], s);
        dt[s] = false;
        fq[s] = 0;
      }
    }
    i = end;
  }

  // refresh pulled copies, touch cached rows; local update iff sole user with a current copy
  std::vector<int64_t> pull_pos, local_pos, grad_pos;
  int64_t n_miss_all = 0, n_update = 0;
  for (int64_t j = 0; j < U; ++j) {
    const bool pulled = miss[j] || update[j];
    const int64_t s = slot[j];
    n_miss_all += miss[j];
    n_update += update[j];
    if (pulled) pull_pos.push_back(j);
    if (s >= 0) {
      if (pulled) lg[s] = 0;
      lu[s] = iteration;
      fq[s] += 1;
    }
    const bool local = users_of(k[j]) == 1 && s >= 0 && (current[j] || pulled);
    (local ? local_pos : grad_pos).push_back(j);
  }
  const int64_t n_miss_push = static_cast<int64_t>(push_keys.size()) - n_shared;
  auto counts = to_tensor({n_miss_all, n_update, n_shared, n_miss_push});
  return {to_tensor(slot),      to_tensor(pull_pos),  to_tensor(local_pos), to_tensor(grad_pos),
          to_tensor(push_keys), to_tensor(push_slots), counts};
}

// id_table_assign: erase `erase_keys`, then map keys[i] -> values[i] (in place)
void id_table_assign_cpu(at::Tensor table, const at::Tensor& erase_keys, const at::Tensor& keys,
                         const at::Tensor& values) {
  const char* op = "id_table_assign";
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 &&
                  table.size(1) == 2 && table.is_contiguous() && table.size(0) >= 2 &&
                  (table.size(0) & (table.size(0) - 1)) == 0,
              "torchrec_esd::", op, ": table must be a contiguous CPU int64 [cap, 2], cap a power of two");
  for (const auto* t : {&erase_keys, &keys, &values})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kLong && t->dim() == 1,
                "torchrec_esd::", op, ": keys and values must be 1-D CPU int64 tensors");
  TORCH_CHECK(keys.numel() == values.numel(), "torchrec_esd::", op, ": ", keys.numel(),
              " keys for ", values.numel(), " values");
  int64_t* tab = table.data_ptr<int64_t>();
  const uint64_t mask = static_cast<uint64_t>(table.size(0) - 1);
  const auto ek = erase_keys.contiguous();
  const auto kk = keys.contiguous();
  const auto vv = values.contiguous();
  const int64_t* e = ek.data_ptr<int64_t>();
  for (int64_t i = 0; i < ek.numel(); ++i) {
    TORCH_CHECK(e[i] >= 0, "torchrec_esd::", op, ": negative key ", e[i]);
    table_erase(tab, mask, e[i]);
  }
  const int64_t* k = kk.data_ptr<int64_t>();
  const int64_t* v = vv.data_ptr<int64_t>();
  for (int64_t i = 0; i < kk.numel(); ++i) {
    TORCH_CHECK(k[i] >= 0, "torchrec_esd::", op, ": negative key ", k[i]);
    TORCH_CHECK(table_insert(tab, mask, k[i], v[i]), "torchrec_esd::", op, ": the table is full (",
                table.size(0), " rows)");
  }
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) {
  m.impl("plan_worker_cache", &plan_worker_cache_cpu);
  m.impl("id_table_assign", &id_table_assign_cpu);
}

}  // namespace torchrec_esd
