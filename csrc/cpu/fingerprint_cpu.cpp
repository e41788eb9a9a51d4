// CPU kernel of torchrec_esd::positioned_mix_sum: the order-aware batch fingerprint's sum
// (torchrec_esd/distributed/plan_channel.py: global_batch_fingerprint; its PyTorch form is the
// reference).  One pass, no temporaries: ~10 elementwise PyTorch ops over every value before.
#include <torch/library.h>
#include <torch/types.h>

#include <cstdint>

namespace torchrec_esd {

namespace {

// every product and sum wraps in 64 bits, as int64 tensor arithmetic does
constexpr uint64_t kValue = static_cast<uint64_t>(-0x4B47D5B1A37C3C43LL);
constexpr uint64_t kPos = 0x2545F4914F6CDD1DULL;
constexpr uint64_t kMix1 = static_cast<uint64_t>(-0x61C8864680B583EBLL);
constexpr uint64_t kMix2 = static_cast<uint64_t>(-0x40A7B892E31B1A47LL);

inline uint64_t shift_xor(uint64_t x, int s) {
  // int64 `>>` of a tensor is arithmetic (sign-extending)
  return x ^ static_cast<uint64_t>(static_cast<int64_t>(x) >> s);
}

template <typename T>
uint64_t mix_sum(const T* v, int64_t n, uint64_t salt) {
  uint64_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    // the value as int64 (sign-extended, uint8 zero-extended: Tensor.to(torch.int64))
    const uint64_t x0 = static_cast<uint64_t>(static_cast<int64_t>(v[i]));
    uint64_t x = x0 * kValue + static_cast<uint64_t>(i) * kPos + salt;
    x = shift_xor(x * kMix1, 31);
    sum += shift_xor(x * kMix2, 29);
  }
  return sum;
}

}  // namespace

at::Tensor positioned_mix_sum_cpu(const at::Tensor& values, int64_t salt) {
  TORCH_CHECK(values.device().is_cpu(), "torchrec_esd::positioned_mix_sum: CPU kernel got a ",
              values.device(), " tensor");
  const at::Tensor v = values.contiguous().view(-1);
  const int64_t n = v.numel();
  const uint64_t s = static_cast<uint64_t>(salt);
  uint64_t sum = 0;
  switch (v.scalar_type()) {
    case at::kLong: sum = mix_sum(v.data_ptr<int64_t>(), n, s); break;
    case at::kInt: sum = mix_sum(v.data_ptr<int32_t>(), n, s); break;
    case at::kShort: sum = mix_sum(v.data_ptr<int16_t>(), n, s); break;
    case at::kByte: sum = mix_sum(v.data_ptr<uint8_t>(), n, s); break;
    default:
      TORCH_CHECK(false, "torchrec_esd::positioned_mix_sum: values must be int64/int32/int16/uint8, got ",
                  v.scalar_type());
  }
  return at::scalar_tensor(static_cast<int64_t>(sum), v.options().dtype(at::kLong));
}

TORCH_LIBRARY_IMPL(torchrec_esd, CPU, m) { m.impl("positioned_mix_sum", &positioned_mix_sum_cpu); }

}  // namespace torchrec_esd
