// CPU kernel of torchrec_esd::hash_ids.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../hash_common.h"

namespace torchrec_esd {

namespace {

template <typename index_t>
void hash_ids_kernel(const index_t* in, int64_t* out, int64_t n, uint64_t feature,
                     uint64_t num_buckets) {
  at::parallel_for(0, n, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      TORCH_CHECK(in[i] >= 0, "torchrec_esd::hash_ids: ids must be non-negative, got ",
                  static_cast<int64_t>(in[i]), " at position ", i);
      out[i] = hash_to_output(hash_feature_id(static_cast<uint64_t>(in[i]), feature),
                              num_buckets);
    }
  });
}

}  // namespace

at::Tensor hash_ids_cpu(const at::Tensor& ids, int64_t feature, int64_t num_buckets) {
  check_hash_ids_args(ids, feature, num_buckets);
  TORCH_CHECK(ids.device().is_cpu(), "torchrec_esd::hash_ids: CPU kernel got a ", ids.device(),
              " tensor");
  at::Tensor in = ids.contiguous();
  at::Tensor out = at::empty({in.numel()}, in.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(in.scalar_type(), "hash_ids_cpu", [&] {
    hash_ids_kernel<index_t>(in.data_ptr<index_t>(), out.data_ptr<int64_t>(), in.numel(),
                             static_cast<uint64_t>(feature), static_cast<uint64_t>(num_buckets));
  });
  return out;
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("hash_ids", &hash_ids_cpu); }

}  // namespace torchrec_esd
