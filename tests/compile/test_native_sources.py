"""Build checks of the native sources that need no GPU.

The CUDA kernels are framework-free, so nvcc alone can compile them here for the archs
setup.py targets, with the half-precision macros torch's CUDAExtension defines.
"""

import importlib
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

CUDA_SOURCES = sorted((Path(__file__).resolve().parents[2] / "csrc" / "cuda").glob("*.cu"))
# torch's CUDAExtension compiles .cu files with these: half types lose their implicit conversions.
TORCH_NVCC_DEFINES = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
]


def test_cuda_sources_exist():
    assert CUDA_SOURCES, "expected CUDA kernels under csrc/cuda/*.cu"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_kernels_compile(source, arch, tmp_path):
    command = ["nvcc", "-c", "-std=c++17", f"-arch={arch}", *TORCH_NVCC_DEFINES, str(source),
               "-o", str(tmp_path / f"{source.stem}.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"


def test_build_info_matches_running_torch():
    try:
        extension = importlib.import_module("lowrank._C")
    except ImportError as exc:
        pytest.skip(f"lowrank._C is not importable: {exc}")
    info = extension.build_info()
    assert info["torch_version"] == torch.__version__
    assert info["with_cuda"] == (info["cuda_version"] is not None)
    if info["with_cuda"]:
        assert torch.version.cuda is not None
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]


def test_an_extension_built_from_older_sources_is_set_aside_naming_the_missing_op(monkeypatch):
    """An editable install pulled past a new op keeps its old lowrank._C: lowrank still imports, and the cpu and
    cuda backends say which op is missing and to rebuild, instead of running half the ops natively."""
    import lowrank
    from lowrank import _backends

    if _backends.EXTENSION is None:
        pytest.skip(f"lowrank._C is not usable: {_backends.backends()['cpu'].reason}")
    monkeypatch.setattr(_backends, "EXTENSION", _backends.EXTENSION)  # restored after the test
    monkeypatch.setattr(_backends, "_EXTENSION_PROBLEM", "")
    assert _backends.has_native_op("lora_linear_forward_native")
    assert not _backends.has_native_op("op_of_newer_sources")
    for name in ("cpu", "cuda"):
        status = lowrank.backends()[name]
        assert not status.available
        assert "lacks lowrank::op_of_newer_sources" in status.reason and "rebuild" in status.reason
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: .*lacks lowrank::op_of_newer_sources"):
        lowrank.ops.grad_reverse(x, 1.0, backend="cpu")
