// Host-side argument checks shared by the CPU and CUDA kernels; the messages
// match torchrec_esd/reference_ops.py (tests assert them).
#pragma once
#include <string>

#include <torch/types.h>

namespace torchrec_esd {

// a contiguous CPU tensor of dtype `type` and `dim` dimensions (host-side kernels' inputs)
inline void check_cpu_tensor(const char* op, const char* name, const at::Tensor& t, at::ScalarType type,
                             int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "torchrec_esd::", op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == type, "torchrec_esd::", op, ": ", name, " must be ", type, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim && t.is_contiguous(), "torchrec_esd::", op, ": ", name, " must be a contiguous ",
              dim, "-D tensor");
}

// the de-duplicated cost model's inputs (DedupCost): occurrences (occ_s, occ_k) of N (sample, row)
// pairs, per-row pull / push costs [U, W], each row's dirty owner and its push cost [U]
inline void check_dedup_model(const char* op, const at::Tensor& occ_s, const at::Tensor& occ_k,
                              const at::Tensor& pull, const at::Tensor& push, const at::Tensor& owner,
                              const at::Tensor& owner_push) {
  check_cpu_tensor(op, "occ_s", occ_s, at::kLong, 1);
  check_cpu_tensor(op, "occ_k", occ_k, at::kLong, 1);
  check_cpu_tensor(op, "pull", pull, at::kDouble, 2);
  check_cpu_tensor(op, "push", push, at::kDouble, 2);
  check_cpu_tensor(op, "owner", owner, at::kLong, 1);
  check_cpu_tensor(op, "owner_push", owner_push, at::kDouble, 1);
  const int64_t U = pull.size(0);
  TORCH_CHECK(occ_k.numel() == occ_s.numel(), "torchrec_esd::", op,
              ": occ_s and occ_k must have the same length, got ", occ_s.numel(), " and ", occ_k.numel());
  TORCH_CHECK(pull.size(1) >= 1, "torchrec_esd::", op, ": pull must have at least one worker column");
  TORCH_CHECK(push.sizes() == pull.sizes(), "torchrec_esd::", op,
              ": push must have pull's shape ", pull.sizes(), ", got ", push.sizes());
  TORCH_CHECK(owner.numel() == U && owner_push.numel() == U, "torchrec_esd::", op,
              ": owner and owner_push must have one entry per row (", U, ")");
}

// every entry of an assignment [B] a worker in [0, W)
inline void check_assignment_workers(const char* op, const int64_t* a, int64_t B, int64_t W) {
  for (int64_t i = 0; i < B; ++i)
    TORCH_CHECK(a[i] >= 0 && a[i] < W, "torchrec_esd::", op, ": assignment[", i, "] = ", a[i],
                " is not a worker in [0, ", W, ")");
}

// every row's dirty owner -1 (none) or a worker in [0, W)
inline void check_owners(const char* op, const int64_t* own, int64_t U, int64_t W) {
  for (int64_t i = 0; i < U; ++i)
    TORCH_CHECK(own[i] >= -1 && own[i] < W, "torchrec_esd::", op, ": owner[", i, "] = ", own[i],
                " is neither -1 nor a worker in [0, ", W, ")");
}

// the data of the occurrences: occ_s sorted, every sample in [0, B) (`b_note` follows the
// bound in the message), every row in [0, U); per_occurrence(i) runs after occurrence i's checks
template <class F>
inline void check_occurrences(const char* op, const int64_t* s, const int64_t* k, int64_t N, int64_t B,
                              int64_t U, const char* b_note, F&& per_occurrence) {
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < B, "torchrec_esd::", op, ": occ_s[", i, "] = ", s[i],
                " is not a sample in [0, ", B, ")", b_note);
    TORCH_CHECK(i == 0 || s[i] >= s[i - 1], "torchrec_esd::", op,
                ": occ_s must be sorted (non-decreasing)");
    TORCH_CHECK(k[i] >= 0 && k[i] < U, "torchrec_esd::", op, ": occ_k[", i, "] = ", k[i],
                " is not a row in [0, ", U, ")");
    per_occurrence(i);
  }
}

inline void check_index_vector(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, "torchrec_esd::", op,
              ": ", name, " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, "torchrec_esd::", op, ": ", name, " must be 1-D, got ", t.dim(),
              "-D");
  TORCH_CHECK(t.is_contiguous(), "torchrec_esd::", op, ": ", name, " must be contiguous");
}

inline void check_same_device(const char* op, const std::string& name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), "torchrec_esd::", op, ": ", name, " is on ",
              t.device(), " but ", ref_name, " is on ", ref.device(),
              "; all tensors must be on the same device");
}

inline void check_slots(const char* op, const std::string& name, const at::Tensor& slots) {
  TORCH_CHECK(slots.scalar_type() == at::kLong, "torchrec_esd::", op, ": ", name,
              " must be int64, got ", slots.scalar_type());
  TORCH_CHECK(slots.dim() == 2 && slots.size(1) == 2, "torchrec_esd::", op, ": ", name,
              " must have shape [cap, 2], got ", slots.sizes());
  const int64_t cap = slots.size(0);
  TORCH_CHECK(cap >= 2 && (cap & (cap - 1)) == 0, "torchrec_esd::", op, ": ", name,
              " capacity must be a power of two >= 2, got ", cap);
  TORCH_CHECK(slots.is_contiguous(), "torchrec_esd::", op, ": ", name, " must be contiguous");
}

inline void check_float_vector(const char* op, const std::string& name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kDouble, "torchrec_esd::", op, ": ", name,
              " must be a float64 tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1, "torchrec_esd::", op, ": ", name, " must be 1-D, got ", t.dim(),
              "-D");
  TORCH_CHECK(t.is_contiguous(), "torchrec_esd::", op, ": ", name, " must be contiguous");
}

// Everything of sample_cost_matrix that can be checked without reading data.
inline void check_cost_args(const at::Tensor& keys, const at::Tensor& offsets,
                            at::TensorList slots, at::TensorList weights,
                            const at::Tensor& miss_weight) {
  const char* op = "sample_cost_matrix";
  check_index_vector(op, "keys", keys);
  check_same_device(op, "offsets", offsets, "keys", keys);
  check_index_vector(op, "offsets", offsets);
  TORCH_CHECK(offsets.numel() >= 1, "torchrec_esd::", op,
              ": offsets must have B+1 >= 1 entries, got 0");
  const int64_t W = static_cast<int64_t>(slots.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == W, "torchrec_esd::", op,
              ": slots and weights must have the same length, got ", W, " and ",
              weights.size());
  TORCH_CHECK(miss_weight.scalar_type() == at::kDouble, "torchrec_esd::", op,
              ": miss_weight must be a float64 tensor, got ", miss_weight.scalar_type());
  TORCH_CHECK(miss_weight.dim() == 1 && miss_weight.numel() == W, "torchrec_esd::", op,
              ": miss_weight must be 1-D with one entry per worker (", W, "), got shape ",
              miss_weight.sizes());
  check_same_device(op, "miss_weight", miss_weight, "keys", keys);
  TORCH_CHECK(miss_weight.is_contiguous(), "torchrec_esd::", op,
              ": miss_weight must be contiguous");
  for (int64_t w = 0; w < W; ++w) {
    const std::string sn = "slots[" + std::to_string(w) + "]";
    const std::string wn = "weights[" + std::to_string(w) + "]";
    check_slots(op, sn, slots[w]);
    check_same_device(op, sn, slots[w], "keys", keys);
    check_float_vector(op, wn, weights[w]);
    check_same_device(op, wn, weights[w], "keys", keys);
  }
}

inline void check_unique_args(const at::Tensor& keys, const at::Tensor& group,
                              int64_t num_groups) {
  const char* op = "unique_keys_per_group";
  check_index_vector(op, "keys", keys);
  check_index_vector(op, "group", group);
  check_same_device(op, "group", group, "keys", keys);
  TORCH_CHECK(keys.numel() == group.numel(), "torchrec_esd::", op,
              ": keys and group must have the same length, got ", keys.numel(), " and ",
              group.numel());
  TORCH_CHECK(num_groups >= 0, "torchrec_esd::", op, ": num_groups must be >= 0, got ",
              num_groups);
}

}  // namespace torchrec_esd
