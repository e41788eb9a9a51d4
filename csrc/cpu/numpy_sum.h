// numpy's float64 summation, reproduced bit for bit so that C++ kernels give
// exactly what their numpy references give (np.add.reduce on a contiguous
// array: pairwise blocks of 128 with 8 accumulators, PW_BLOCKSIZE 128).
#pragma once
#include <cstdint>
#include <vector>

namespace torchrec_esd {

// numpy's pairwise_sum of a[0:n] (its small-n loop starts from -0.0)
inline double pairwise_sum(const double* a, int64_t n) {
  if (n < 8) {
    double res = -0.0;
    for (int64_t i = 0; i < n; ++i) res += a[i];
    return res;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    int64_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  int64_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

// np.sum of a 1-D float64 array: the identity 0.0 plus the pairwise sum
inline double numpy_sum(const std::vector<double>& a) {
  return 0.0 + pairwise_sum(a.data(), static_cast<int64_t>(a.size()));
}

}  // namespace torchrec_esd
