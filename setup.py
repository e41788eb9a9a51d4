"""Build torchrec_esd and its operator extension torchrec_esd._C.

CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp) are always built; CUDA kernels
(csrc/cuda/*.cu) only when torch sees CUDA and a toolkit is present, or when
TORCHREC_ESD_CUDA=1 forces it (TORCHREC_ESD_CUDA=0 disables it).

The extension is compiled against the torch installed in the build
environment, so install without build isolation (pyproject.toml):

    pip install --no-build-isolation .      # or: pip install --no-build-isolation -e .
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("TORCHREC_ESD_CUDA", "auto").lower()
    if flag in ("0", "false", "no"):
        return False
    if flag in ("1", "true", "yes"):
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def _extension():
    rel = lambda pattern: sorted(  # noqa: E731
        os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern))
    )
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # at::parallel_for is OpenMP-based in torch's CPU builds: without -fopenmp
    # the kernels would run on one thread (torch's own libgomp is reused)
    # -ffp-contract=off: no fused multiply-adds, so that the kernels that equal a numpy /
    # PyTorch reference bit for bit (csrc/cpu/heuristic_cpu.cpp, group_slice_cpu.cpp) stay equal
    # whatever -march a build adds
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"]
    link = ["-fopenmp"]
    if _want_cuda():
        return CUDAExtension(
            "torchrec_esd._C",
            sources + rel("csrc/cuda/*.cu"),
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-Xcompiler", "-fopenmp"]},
            extra_link_args=link,
        )
    return CppExtension("torchrec_esd._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


# name, version, dependencies and packages: pyproject.toml
setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
