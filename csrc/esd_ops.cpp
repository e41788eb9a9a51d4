// Operator schemas of the torchrec_esd extension.
//
// Schemas live here, in one TORCH_LIBRARY block; kernels are registered per
// dispatch key in csrc/cpu/*.cpp (always built) and csrc/cuda/*.cu (built only
// when CUDA is available).  Python reaches them through torchrec_esd/ops.py.
#include <Python.h>
#include <torch/library.h>

#include <exception>

// csrc/reply_clock.cpp: the native waiter of posted receives (a pybind11 class)
void register_reply_clock(PyObject* module);

extern "C" {
// Importing torchrec_esd._C runs the static initialisers below, which register
// the operators with the dispatcher; the Python module itself holds only
// NativeReplyClock (csrc/reply_clock.cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torchrec_esd operators (see torchrec_esd.ops)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  try {
    register_reply_clock(module);
  } catch (const std::exception& e) {
    Py_DECREF(module);
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(torchrec_esd, m) {
  // 64-bit key (num_buckets == 0) or bucket in [0, num_buckets) of every
  // (feature, id) pair; stable across runs, processes and devices.
  m.def("hash_ids(Tensor ids, int feature, int num_buckets) -> Tensor");

  // Open-addressing (linear probing) table of unique keys >= 0: int64 [cap, 2]
  // rows (key, index of the key in `keys`), empty rows (-1, -1),
  // cap = next power of two >= max(2, 2 * len(keys)).
  m.def("id_table_build(Tensor keys) -> Tensor");
  // Index stored for every query key, -1 when absent (int64, queries' shape).
  m.def("id_table_lookup(Tensor slots, Tensor queries) -> Tensor");
  // float64 [B, W]: sum over the distinct keys of sample b of weights[w][idx]
  // (key in slots[w] at idx) or miss_weight[w] (key absent).
  m.def(
      "sample_cost_matrix(Tensor keys, Tensor offsets, Tensor[] slots, Tensor[] weights, "
      "Tensor miss_weight) -> Tensor");
  // Distinct (group, key) pairs sorted by (group, key) and their multiplicities.
  m.def(
      "unique_keys_per_group(Tensor keys, Tensor group, int num_groups) -> "
      "(Tensor unique_keys, Tensor unique_group, Tensor counts)");
  // One worker's cache step of one iteration (CacheDirectory._push_shared_dirty
  // and _plan_worker without DES-served rows): pushes dirty rows other workers
  // use, looks up the ascending distinct `keys`, evicts (in the order of the
  // eviction `policy` code: 0 LRU, 1 LFU, torchrec_esd.cache.policy.KernelPolicy),
  // places misses, refreshes and touches the cache state in place; returns the
  // slot of every key (-1: transient), the positions pulled, updated locally
  // and pushed as gradients, the value pushes (keys, slots: shared dirty rows,
  // then evicted dirty rows) and (miss pulls, update pulls, shared pushes,
  // miss pushes).
  // The slot map is dense (int32 [rows]) or an id table (int64 [cap, 2], row = (key, slot));
  // `lag` is how many versions each cached copy is behind; `user_keys` / `user_counts` the
  // rows used this iteration (ascending) and how many workers use each; `user_table`, if
  // given, an id table of user_keys (id_table_build): their counts are found by probing it
  // instead of a binary search, and their order is not checked (what a caller that steps
  // many workers on the same rows passes, built once).
  m.def(
      "plan_worker_cache(Tensor(a!) slot_keys, Tensor(b!) last_use, Tensor(c!) freq, "
      "Tensor(d!) lag, Tensor(e!) dirty, Tensor(f!) slot_map, Tensor table_start, "
      "Tensor user_keys, Tensor user_counts, Tensor keys, Tensor row_offset, int iteration, "
      "int staleness, int policy, Tensor? user_table=None) -> "
      "(Tensor used_slot, Tensor pull_pos, Tensor local_pos, Tensor grad_pos, "
      "Tensor push_keys, Tensor push_slots, Tensor counts)");
  // In place on an id table (int64 [cap, 2], linear probing, see id_table_build): erase
  // `erase_keys` (absent ones ignored, backward-shift deletion), then map keys[i] -> values[i]
  // (a full table is an error).  CPU only (cache directories live on the host).
  m.def("id_table_assign(Tensor(a!) table, Tensor erase_keys, Tensor keys, Tensor values) -> ()");
  // Local search on a batch's de-duplicated cost (torchrec_esd.cost.DedupCost: distinct
  // (sample, row) occurrences occ_s (sorted) / occ_k, float64 [U, W] pull and push, owner [U]
  // (-1: none), owner_push [U]) from `assignment` ([B], worker per sample), by swaps of two
  // samples' workers and group moves (the <= group_size users of a row on one worker move to
  // another user worker, as many samples back; 0: none), each applied move lowering the cost;
  // stops at a local optimum of the swap neighbourhood where no group move improves, after
  // max_rounds passes or after time_budget_s seconds (inf: none).  Returns the refined
  // assignment, the applied swaps in order (int64 [n, 3]: sample moving x -> y, sample moving
  // y -> x, index of the move it belongs to) and float64 [7] info: (passes, moves, swaps,
  // start cost, cost, stop code 0 local optimum / 1 max_rounds / 2 deadline, pairs evaluated).
  // CPU only (the dispatch decision runs on the host).
  m.def(
      "dedup_refine(Tensor occ_s, Tensor occ_k, Tensor pull, Tensor push, Tensor owner, "
      "Tensor owner_push, Tensor assignment, int max_rounds, float time_budget_s, "
      "int group_size) -> (Tensor refined, Tensor swaps, Tensor info)");
  // The esd dispatcher's start assignment on a batch's de-duplicated cost (the arrays of
  // dedup_refine; `divisor` / `p_shared` float64 [T, W] the amortisation tables indexed by a
  // row's number of using samples, torchrec_esd.cost.dedup.amortise_table): the amortised
  // [B, W] matrix, `price_sweeps` sweeps of dual prices and the price-adjusted regret greedy
  // with the given shares (B = their sum).  Returns the assignment (int64 [B]) and the
  // prices (float64 [W]).  CPU only.
  m.def(
      "dedup_start(Tensor occ_s, Tensor occ_k, Tensor pull, Tensor push, Tensor owner, "
      "Tensor owner_push, Tensor divisor, Tensor p_shared, int[] shares, int price_sweeps) -> "
      "(Tensor assignment, Tensor prices)");
  // dedup_start then dedup_refine from its assignment in one call (the time the start takes
  // counts in time_budget_s): returns dedup_refine's (refined, swaps, info) and the start.
  m.def(
      "dedup_decide(Tensor occ_s, Tensor occ_k, Tensor pull, Tensor push, Tensor owner, "
      "Tensor owner_push, Tensor divisor, Tensor p_shared, int[] shares, int price_sweeps, "
      "int max_rounds, float time_budget_s, int group_size) -> "
      "(Tensor refined, Tensor swaps, Tensor info, Tensor start)");
  // The de-duplicated cost model of one batch (torchrec_esd.cost.DedupCost) and its additive
  // [B, W] matrix from the batch read (sample-major keys, offsets, the id table of its distinct
  // keys, their tables, the cached (worker, key) pairs with their outdated / dirty flags), the
  // caches' occupied / dirty / capacity rows per (worker, table) and the seconds of one row on
  // every worker's link per table.  CPU only.
  m.def(
      "dedup_inputs(Tensor keys, Tensor offsets, Tensor slots, Tensor table_of, Tensor hit_worker, "
      "Tensor hit_key, Tensor hit_outdated, Tensor hit_dirty, Tensor occupied, Tensor ndirty, "
      "Tensor capacity, Tensor row_time) -> "
      "(Tensor occ_s, Tensor occ_k, Tensor pull, Tensor push, Tensor owner, Tensor owner_push, "
      "Tensor additive)");
  // Holder index (torchrec_esd/cache/holders.py, csrc/cpu/holders_cpu.cpp): row key -> every
  // global cache slot holding it, as a doubly linked list per key (next/prev over the global
  // slots, the list heads in an id table, gkey the key recorded at every global slot).  Sync
  // makes slots [base, base + len(slot_keys)) record slot_keys (in place) and returns the keys
  // that left a slot (int64, slot order); lookup returns, per query key, every holder (query
  // position, global slot), queries in order.  CPU only.
  m.def(
      "holder_index_sync(Tensor(a!) head, Tensor(b!) next, Tensor(c!) prev, Tensor(d!) gkey, "
      "int base, Tensor slot_keys) -> Tensor");
  // lanes: how many lists are walked side by side (0: one after the other; -1: by the index's
  // size, side by side once `next` outgrows the caches).
  m.def(
      "holder_index_lookup(Tensor head, Tensor next, Tensor queries, int lanes=-1) -> (Tensor pos, "
      "Tensor slots)");
  // Grouped dispatch (csrc/cpu/heuristic_cpu.cpp), each equal bit for bit to its Python
  // reference.  The regret heuristic of HeuristicDispatcher(objective="total", improve_sweeps=0)
  // on a float64 [B, W] cost (torchrec_esd.dispatch.heuristic.price_greedy + dual_value):
  // (assignment int64 [B], prices float64 [W], lower bound float64 []).  CPU only.
  m.def("heuristic_total_solve(Tensor cost, Tensor shares, int price_sweeps) -> "
        "(Tensor assignment, Tensor prices, Tensor lower_bound)");
  // The [B, G] stage-1 price of GroupInputs.group_matrix from the cached (key, group, outdated)
  // hits (group -1: no group), each key's table, the per-group [T, G] fastest row time and
  // lowest eviction push, each key's use count, the per-group share term `per`, and the
  // distinct (sample, key) pairs (occ_s sorted).  CPU only.
  m.def(
      "group_price(Tensor hit_key, Tensor hit_group, Tensor hit_outdated, Tensor table_of, "
      "Tensor row_time, Tensor evict_time, Tensor uses, Tensor per, int num_samples, Tensor occ_s, "
      "Tensor occ_k) -> Tensor");
  // The same [B, G] price of a batch slice from its sample-major row keys (offsets [B + 1])
  // and the holder index's group bits (id table key -> held | fresh << 31), per table row
  // offsets [T + 1], [T, G] row time / eviction push and per [G]: nothing per cached copy
  // (group_matrix_from_bits, csrc/cpu/group_bits_cpu.cpp).  CPU only.
  m.def(
      "group_price_bits(Tensor keys, Tensor offsets, Tensor bits_table, Tensor row_offset, "
      "Tensor row_time, Tensor evict_time, Tensor per) -> Tensor");
  // The holder index's group bits and dirty owners of some keys from all their cached copies
  // (HolderIndex._assign, in place on the two id tables; csrc/cpu/group_bits_cpu.cpp).  CPU only.
  m.def(
      "group_bits_assign(Tensor(a!) bits_table, Tensor(b!) owner_table, Tensor keys, Tensor pos, "
      "Tensor worker, Tensor outdated, Tensor dirty, Tensor list_of, int num_groups) -> ()");
  // One group's [B_g, |g|] slice of the expected cost matrix (GroupInputs.sub_matrix(samples,
  // workers, "expected"), csrc/cpu/group_slice_cpu.cpp): the ascending samples' distinct (sample,
  // key) pairs (pair_ptr / occ_k), the hits in worker order (hit_ptr [W + 1], key, outdated), per
  // key its table, use count, dirty owner (-1: none) and owner push, per worker [W, T] row time and
  // eviction push and its expected-matrix share, and p_shared [distinct uses, |g|] (numpy's pow)
  // with uses_index [U] its row per key.  CPU only.
  m.def(
      "group_slice_expected(Tensor samples, Tensor workers, Tensor pair_ptr, Tensor occ_k, Tensor hit_ptr, "
      "Tensor hit_key, Tensor hit_outdated, Tensor table_of, Tensor row_time, Tensor evict_time, Tensor uses, "
      "Tensor owner, Tensor owner_push, Tensor shares, Tensor p_shared, Tensor uses_index, int num_samples) "
      "-> Tensor");
  // The distinct (sample, key index) pairs of a batch's sample-major key indices `kidx` (per-sample
  // `offsets`), sorted by (sample, key), with their per-sample offsets [B + 1] and every key's
  // use count (float64 [num_keys]).  CPU only.
  m.def("sample_key_pairs(Tensor offsets, Tensor kidx, int num_keys) -> "
        "(Tensor occ_s, Tensor occ_k, Tensor pair_ptr, Tensor uses)");
  // Stable order of `bins` (values in [0, num_bins)) by value and the bins' offsets [num_bins + 1]
  // (a counting sort; torch.argsort(stable=True) + bincount is its reference).  CPU only.
  m.def("bucket_order(Tensor bins, int num_bins) -> (Tensor order, Tensor ptr)");
  // A worker's occupied (key >= 0) and dirty cache slots per table, whose slots are the
  // contiguous ranges table_start[t]:table_start[t + 1]: two int64 [T] tensors.
  m.def("slot_table_counts(Tensor keys, Tensor dirty, Tensor table_start) -> (Tensor, Tensor)");
  // holder_index_lookup plus, per hit, its worker (base [W + 1] the workers' first global slots;
  // bucket_worker[g >> shift] the worker of a bucket's first slot, every worker holding at least
  // 2^shift slots, or empty: a binary search over base) and its slot's flags: outdated = lag > 0
  // and not dirty, dirty.  Returns (pos, worker, outdated, dirty).  CPU only.
  m.def(
      "holder_index_read(Tensor head, Tensor next, Tensor base, Tensor bucket_worker, int shift, Tensor lag, "
      "Tensor dirty, Tensor queries, int lanes=-1) -> (Tensor pos, Tensor worker, Tensor outdated, Tensor dirty_out)");
  // 0-d int64: the wrapping sum over i of mix(values[i] * C + i * P + salt) (values as int64; mix:
  // splitmix64's two multiply-xorshift steps with arithmetic shifts): one part of the global batch
  // fingerprint (torchrec_esd/distributed/plan_channel.py, whose PyTorch form is the reference).
  // CPU only.
  m.def("positioned_mix_sum(Tensor values, int salt) -> Tensor");
  // DedupCost.per_worker (torchrec_esd/cost/dedup.py, the reference): float64 [W] predicted link
  // seconds of every worker for `assignment` [B] (its pulls, its pushes of shared rows, the dirty
  // rows it owns and pushes).  CPU only.
  m.def(
      "dedup_per_worker(Tensor occ_s, Tensor occ_k, Tensor pull, Tensor push, Tensor owner, "
      "Tensor owner_push, Tensor assignment) -> Tensor");
}
