// Operator schemas of the torchrec_esd extension.
//
// Schemas live here, in one TORCH_LIBRARY block; kernels are registered per
// dispatch key in csrc/cpu/*.cpp (always built) and csrc/cuda/*.cu (built only
// when CUDA is available).  Python reaches them through torchrec_esd/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing torchrec_esd._C runs the static initialisers below, which register
// the operators with the dispatcher; the Python module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "torchrec_esd operators (see torchrec_esd.ops)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(torchrec_esd, m) {
  // 64-bit key (num_buckets == 0) or bucket in [0, num_buckets) of every
  // (feature, id) pair; stable across runs, processes and devices.
  m.def("hash_ids(Tensor ids, int feature, int num_buckets) -> Tensor");
}
