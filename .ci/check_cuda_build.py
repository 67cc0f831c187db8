"""Check a CUDA build of lowrank._C on a machine without a GPU: it loads, it was compiled with
CUDA, and every op it defines has a CPU and a CUDA kernel (and, once lowrank is imported, a
Meta one). Run with the python of the venv it was installed into:

  python .ci/check_cuda_build.py
"""

import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch


def load_extension_alone():
    """lowrank._C loaded before the rest of lowrank, so that the lowrank:: ops registered then are
    exactly those its TORCH_LIBRARY block defines."""
    package = importlib.util.find_spec("lowrank")
    if package is None:
        sys.exit("lowrank is not installed in this venv")
    found = sorted(Path(package.submodule_search_locations[0]).glob("_C*.so"))
    if len(found) != 1:
        sys.exit(f"expected one lowrank/_C*.so beside {package.origin}, found {found}")
    loader = importlib.machinery.ExtensionFileLoader("lowrank._C", str(found[0]))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("lowrank._C", loader))
    loader.exec_module(module)
    sys.modules["lowrank._C"] = module
    return module, found[0]


def sm90_kernel_resources(path: Path) -> list[tuple[str, int, int, int]]:
    """(kernel, registers, stack bytes, static shared bytes) of each sm_90 kernel in the shared
    object, read from its cubins with cuobjdump (the one bundled with triton)."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    dump = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(path)],
                          capture_output=True, text=True, check=True).stdout
    resources, arch = [], None
    for line in dump.splitlines():
        if line.startswith("arch = "):
            arch = line.split("=")[1].strip()
        elif (function := re.match(r"\s*Function (\S+):", line)) and arch == "sm_90":
            name = function.group(1)
        elif (usage := re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)) and arch == "sm_90":
            resources.append((name, *map(int, usage.groups())))
    if shutil.which("c++filt"):
        names = subprocess.run(["c++filt"], input="\n".join(r[0] for r in resources),
                               capture_output=True, text=True, check=True).stdout.splitlines()
        # lowrank::cuda::(anonymous namespace)::kernel<T, ...>(arguments) -> kernel<T, ...>
        names = [re.sub(r"^.*::(\w+<[^()]*>)\(.*$", r"\1", name) for name in names]
        resources = [(name, *rest) for name, (_, *rest) in zip(names, resources)]
    return resources


def has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


def main() -> int:
    extension, path = load_extension_alone()
    native = sorted(name for name in torch._C._dispatch_get_all_op_names() if name.startswith("lowrank::"))
    info = extension.build_info()
    print(f"{path.name}: built for torch {info['torch_version']}, CUDA {info['cuda_version']} "
          f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    problems = []
    if not info["with_cuda"]:
        problems.append("the extension was built without CUDA")
    elif info["cuda_version"].split(".")[0] != torch.version.cuda.split(".")[0]:
        problems.append(f"built with CUDA {info['cuda_version']} but torch has CUDA {torch.version.cuda}")
    if not native:
        problems.append("the extension registers no lowrank:: ops")

    import lowrank  # registers the Python ops and the fake (Meta) kernels

    print(f"{'native op':44s} CPU  CUDA Meta")
    for op in native:
        keys = {key: has_kernel(op, key) for key in ("CPU", "CUDA", "Meta")}
        print(f"{op:44s} " + " ".join(f"{'yes' if present else 'NO':4s}" for present in keys.values()))
        problems += [f"{op} has no {key} kernel" for key, present in keys.items() if not present]
    cuda_kernels = sum(has_kernel(op, "CUDA") for op in native)
    print(f"{len(native)} native ops, {cuda_kernels} with a CUDA kernel registered")

    resources = sm90_kernel_resources(path)
    print(f"\n{'sm_90 CUDA kernel':64s} {'regs':>4s} {'stack B':>7s} {'smem B':>6s}")
    for name, registers, stack, shared in sorted(resources):
        print(f"{name[:64]:64s} {registers:4d} {stack:7d} {shared:6d}")
    if not resources:
        problems.append("no sm_90 code in the extension")

    status = lowrank.backends()
    for name, backend in status.items():
        print(f"  {name:7s} {'yes' if backend.available else 'no '}  {backend.reason}")
    for name in ("cuda", "triton"):
        if not status[name].available and "no CUDA device" not in status[name].reason:
            problems.append(f"backend {name} is unavailable for a reason other than the missing GPU: "
                            f"{status[name].reason}")
    for problem in problems:
        print(f"FAIL {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
