// CUDA kernel of torchrec_esd::hash_ids (built only when CUDA is available).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/types.h>

#include "../hash_common.h"

namespace torchrec_esd {

namespace {

template <typename index_t>
__global__ void hash_ids_cuda_kernel(const index_t* __restrict__ in, int64_t* __restrict__ out,
                                     int64_t n, uint64_t feature, uint64_t num_buckets,
                                     int* __restrict__ negative) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
       i += (int64_t)gridDim.x * blockDim.x) {
    index_t v = in[i];
    if (v < 0) *negative = 1;
    out[i] = hash_to_output(hash_feature_id(static_cast<uint64_t>(v), feature), num_buckets);
  }
}

}  // namespace

at::Tensor hash_ids_cuda(const at::Tensor& ids, int64_t feature, int64_t num_buckets) {
  check_hash_ids_args(ids, feature, num_buckets);
  c10::cuda::CUDAGuard guard(ids.device());
  at::Tensor in = ids.contiguous();
  at::Tensor out = at::empty({in.numel()}, in.options().dtype(at::kLong));
  at::Tensor negative = at::zeros({1}, in.options().dtype(at::kInt));
  const int64_t n = in.numel();
  if (n > 0) {
    const int threads = 256;
    const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, 65535));
    AT_DISPATCH_INDEX_TYPES(in.scalar_type(), "hash_ids_cuda", [&] {
      hash_ids_cuda_kernel<index_t><<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
          in.data_ptr<index_t>(), out.data_ptr<int64_t>(), n, static_cast<uint64_t>(feature),
          static_cast<uint64_t>(num_buckets), negative.data_ptr<int>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    TORCH_CHECK(negative.item<int>() == 0, "torchrec_esd::hash_ids: ids must be non-negative");
  }
  return out;
}

TORCH_LIBRARY_IMPL(torchrec_esd, CUDA, m) { m.impl("hash_ids", &hash_ids_cuda); }

}  // namespace torchrec_esd
