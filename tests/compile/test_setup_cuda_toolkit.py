"""setup.py finds a CUDA toolkit that has its headers, or stops and says what it tried.

Fake toolkits in tmp_path stand in for real ones: a folder with bin/nvcc (a script that answers
--dryrun as nvcc does) and include/cuda_runtime.h."""

import importlib.util
import os
import stat
from pathlib import Path

import pytest

SETUP_PY = Path(__file__).resolve().parents[2] / "setup.py"


@pytest.fixture
def setup_module(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("lowrank_setup", SETUP_PY)  # not __main__: no setup() call
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for variable in ("CUDA_HOME", "CUDA_PATH", "LOWRANK_CUDA"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-path"))
    monkeypatch.setattr(module, "USUAL_CUDA_HOME", str(tmp_path / "no-usual-cuda"))
    return module


def _script(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def _toolkit(root: Path, headers: bool = True) -> Path:
    _script(root / "bin" / "nvcc", f'echo "#$ _HERE_={root / "bin"}" >&2\n')
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("")
    return root


def test_wrapper_nvcc_outside_the_toolkit_is_resolved(setup_module, tmp_path, monkeypatch):
    """The dev machines' nvcc is a one-line script elsewhere; its parent has no headers."""
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "wrappers" / "bin" / "nvcc", f'exec {toolkit / "bin" / "nvcc"} "$@"\n')
    monkeypatch.setenv("PATH", str(tmp_path / "wrappers" / "bin"))
    home, tried = setup_module.find_cuda_toolkit()
    assert home == os.path.realpath(toolkit) and tried == []


def test_usual_folder_when_nvcc_is_not_on_path(setup_module, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "usual-cuda")
    monkeypatch.setattr(setup_module, "USUAL_CUDA_HOME", str(toolkit))
    assert setup_module.find_cuda_toolkit()[0] == os.path.realpath(toolkit)


def test_cuda_home_without_headers_stops_the_build_and_names_it(setup_module, tmp_path, monkeypatch):
    broken = _toolkit(tmp_path / "broken", headers=False)
    monkeypatch.setenv("CUDA_HOME", str(broken))
    monkeypatch.setattr(setup_module.torch.version, "cuda", "13.0")
    with pytest.raises(SystemExit) as stop:
        setup_module.cuda_home_for_build()
    message = str(stop.value)
    assert f"{broken} (CUDA_HOME): no include/cuda_runtime.h" in message
    assert "LOWRANK_CUDA=0" in message


def test_auto_without_any_toolkit_builds_for_cpu(setup_module, monkeypatch):
    monkeypatch.setattr(setup_module.torch.version, "cuda", "13.0")
    assert setup_module.cuda_home_for_build() is None


def test_cuda_required_without_a_toolkit_lists_what_was_tried(setup_module, monkeypatch, tmp_path):
    monkeypatch.setattr(setup_module.torch.version, "cuda", "13.0")
    monkeypatch.setenv("LOWRANK_CUDA", "1")
    with pytest.raises(SystemExit, match="no-usual-cuda \\(the usual CUDA folder\\): no bin/nvcc"):
        setup_module.cuda_home_for_build()


def test_cuda_required_with_a_cpu_torch_is_refused(setup_module, monkeypatch):
    monkeypatch.setattr(setup_module.torch.version, "cuda", None)
    monkeypatch.setenv("LOWRANK_CUDA", "1")
    with pytest.raises(SystemExit, match="built without CUDA"):
        setup_module.cuda_home_for_build()


def test_bad_switch_value_is_refused(setup_module, monkeypatch):
    monkeypatch.setenv("LOWRANK_CUDA", "yes")
    with pytest.raises(SystemExit, match="LOWRANK_CUDA must be auto, 0 or 1, got 'yes'"):
        setup_module.cuda_home_for_build()


def test_no_cxx_standard_is_forced(setup_module, monkeypatch):
    """torch's BuildExtension adds its default standard (which torch 2.14's headers need: C++20)
    only when no -std flag is given."""
    monkeypatch.setenv("LOWRANK_CUDA", "0")
    monkeypatch.chdir(SETUP_PY.parent)
    flags = setup_module.extension().extra_compile_args
    assert flags["cxx"] and not [flag for flags_of in flags.values() for flag in flags_of if flag.startswith("-std")]
