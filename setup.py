"""Build lowrank and its C++/CUDA extension lowrank._C.

Switches (environment variables):
  LOWRANK_CUDA=auto|0|1     build csrc/cuda/ (auto: when torch has CUDA and a CUDA toolkit is found)
  CUDA_HOME                 the CUDA toolkit; default: the one the nvcc on PATH belongs to, else /usr/local/cuda
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0+PTX" (sm_80 and sm_90 SASS, sm_90 PTX that
                            the driver compiles for newer GPUs)
  MAX_JOBS                  parallel compile jobs for ninja
Install without build isolation so the extension is built against the torch you run:
  pip install --no-build-isolation .
The C++ standard is the one the installed torch asks for (its headers need C++20 from torch 2.14,
older ones accept C++17): torch's BuildExtension adds its default because no -std flag is given here.
"""

import glob
import os
import re
import shutil
import subprocess

import torch
from setuptools import setup
from torch.utils import cpp_extension

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
CUDA_HEADER = os.path.join("include", "cuda_runtime.h")
USUAL_CUDA_HOME = "/usr/local/cuda"


def nvcc_toolkit(nvcc: str) -> str | None:
    """The toolkit an nvcc belongs to, as nvcc itself reports it (_HERE_ is its real bin folder,
    also when the nvcc on PATH is a wrapper script or a symlink outside the toolkit)."""
    try:
        done = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    here = re.search(r"^#\$ _HERE_=(.+)$", done.stdout + done.stderr, re.MULTILINE)
    return os.path.dirname(here.group(1).strip()) if here else None


def cuda_toolkit_candidates() -> list[tuple[str, str]]:
    """(folder, where the guess came from), most specific first."""
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            return [(os.environ[variable], variable)]  # an explicit choice is never second-guessed
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        reported = nvcc_toolkit(nvcc)
        if reported:
            candidates.append((reported, f"the toolkit that {nvcc} reports"))
        candidates.append((os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), f"the parent of {nvcc}'s folder"))
    candidates.append((USUAL_CUDA_HOME, "the usual CUDA folder"))
    return candidates


def find_cuda_toolkit() -> tuple[str | None, list[str]]:
    """(a toolkit folder with nvcc and the CUDA headers, or None; what was tried and found missing)."""
    tried = []
    for folder, origin in cuda_toolkit_candidates():
        missing = [part for part in (os.path.join("bin", "nvcc"), CUDA_HEADER)
                   if not os.path.exists(os.path.join(folder, part))]
        if not missing:
            return os.path.realpath(folder), tried
        tried.append(f"{folder} ({origin}): no {' and no '.join(missing)}")
    return None, tried


def cuda_home_for_build() -> str | None:
    """The toolkit to build csrc/cuda/ with, or None for a CPU-only build; stops the build with a
    message naming every folder tried when CUDA was asked for but no usable toolkit is there."""
    mode = os.environ.get("LOWRANK_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"LOWRANK_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return None
    if torch.version.cuda is None:
        if mode == "1":
            raise SystemExit(f"LOWRANK_CUDA=1 but torch {torch.__version__} was built without CUDA")
        return None
    home, tried = find_cuda_toolkit()
    if home is None:
        # auto with no nvcc and no CUDA_HOME is a CPU-only machine; a toolkit without its
        # headers is a broken one, which a silent CPU-only build would hide.
        pointed_at = shutil.which("nvcc") or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
        if mode == "1" or pointed_at:
            raise SystemExit(
                f"LOWRANK_CUDA={mode}: torch {torch.__version__} has CUDA {torch.version.cuda}, but no CUDA toolkit "
                "with nvcc and its headers was found. Tried:\n  " + "\n  ".join(tried)
                + "\nSet CUDA_HOME to the toolkit (the folder with bin/nvcc and include/cuda_runtime.h), "
                "or LOWRANK_CUDA=0 for a CPU-only build."
            )
        return None
    return home


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("LOWRANK_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx_flags = ["-O3", "-fopenmp"]
    cuda_home = cuda_home_for_build()
    if cuda_home is None:
        return cpp_extension.CppExtension(
            "lowrank._C", sources, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=["-fopenmp"],
        )
    # torch.utils.cpp_extension guessed its CUDA_HOME at import, from PATH alone.
    os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    print(f"lowrank: building the CUDA extension with {cuda_home} for TORCH_CUDA_ARCH_LIST={archs}")
    sources += sorted(glob.glob("csrc/cuda/*.cpp") + glob.glob("csrc/cuda/*.cu"))
    return cpp_extension.CUDAExtension(
        "lowrank._C", sources,
        define_macros=define_macros + [("LOWRANK_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


# pip runs this file as __main__; tests import it under another name to check the helpers above.
if __name__ == "__main__":
    setup(
        packages=["lowrank", "lowrank.ops", "lowrank.nn", "lowrank.kernels", "lowrank.data", "lowrank.da",
                  "lowrank.finetune", "lowrank.tuners", "lowrank.tuners.lora", "lowrank.tuners.bottleneck",
                  "lowrank.tuners.prompt"],
        package_dir={"lowrank": "lowrank", "lowrank.kernels": "kernels"},
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
