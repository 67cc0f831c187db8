"""Build lowrank and its C++/CUDA extension lowrank._C.

Switches (environment variables):
  LOWRANK_CUDA=auto|0|1     build csrc/cuda/ (auto: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0" (sm_80 and sm_90)
  MAX_JOBS                  parallel compile jobs for ninja
Install without build isolation so the extension is built against the torch you run:
  pip install --no-build-isolation .
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension


def want_cuda() -> bool:
    mode = os.environ.get("LOWRANK_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LOWRANK_CUDA must be auto, 0 or 1, got {mode!r}")
    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not has_cuda:
        raise SystemExit(
            "LOWRANK_CUDA=1 but this torch has no CUDA support or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return mode != "0" and has_cuda


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("LOWRANK_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    if not want_cuda():
        return cpp_extension.CppExtension(
            "lowrank._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    return cpp_extension.CUDAExtension(
        "lowrank._C", sources,
        define_macros=define_macros + [("LOWRANK_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["lowrank", "lowrank.ops", "lowrank.nn", "lowrank.kernels", "lowrank.data", "lowrank.da", "lowrank.finetune"],
    package_dir={"lowrank": "lowrank", "lowrank.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
