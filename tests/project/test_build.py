"""Build settings (build_support.py, used by setup.py) and the packaging metadata of pyproject.toml."""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch

import segformer_fast

from helpers import ROOT


def _load_build_support():
    """build_support.py from its file, as setup.py loads it (the repository root never goes on sys.path: its
    kernels/ folder would shadow Hugging Face's ``kernels``)."""
    spec = importlib.util.spec_from_file_location("segformer_fast_build_support", ROOT / "build_support.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_build_support = _load_build_support()
DEFAULT_CUDA_ARCH_LIST = _build_support.DEFAULT_CUDA_ARCH_LIST
cxx_standard = _build_support.cxx_standard
filter_cuda_arch_list = _build_support.filter_cuda_arch_list
openmp_flags = _build_support.openmp_flags


# -------------------------------------------------------------------------------------------- CUDA architectures
@pytest.mark.parametrize("value", [None, "", "  "])
def test_arch_list_default(value):
    assert filter_cuda_arch_list(value) == (DEFAULT_CUDA_ARCH_LIST, [])
    assert DEFAULT_CUDA_ARCH_LIST == "8.0;9.0+PTX"


@pytest.mark.parametrize(
    ("value", "kept", "dropped"),
    [
        ("8.0;9.0", "8.0;9.0", []),
        ("7.5;8.0;9.0", "8.0;9.0", ["7.5"]),
        ("6.1 7.0 7.5+PTX 8.6", "8.6", ["6.1", "7.0", "7.5+PTX"]),
        ("8.9;9.0a;10.0+PTX", "8.9;9.0a;10.0+PTX", []),
        ("9.0+PTX;", "9.0+PTX", []),
        (" 8.0 ;; 12.0 ", "8.0;12.0", []),
    ],
)
def test_arch_list_keeps_sm80_and_newer(value, kept, dropped):
    assert filter_cuda_arch_list(value) == (kept, dropped)


@pytest.mark.parametrize("value", ["7.5", "6.0;7.0;7.5+PTX"])
def test_arch_list_without_sm80_fails_clearly(value):
    with pytest.raises(ValueError) as info:
        filter_cuda_arch_list(value)
    message = str(info.value)
    assert repr(value) in message and "8.0" in message and "SEGFORMER_FAST_NO_CUDA=1" in message


@pytest.mark.parametrize("entry", ["Hopper", "90", "9.0+ptx", "sm_90"])
def test_arch_list_rejects_malformed_entries(entry):
    with pytest.raises(ValueError, match=re.escape(f"entry '{entry}' is not of the form MAJOR.MINOR")):
        filter_cuda_arch_list(f"8.0;{entry}")


# ------------------------------------------------------------------------------------------------ C++ standard
@pytest.mark.parametrize(
    ("version", "standard"),
    [("2.13.0+cpu", "c++20"), ("2.10.0", "c++20"), ("3.0.1", "c++20"), ("2.9.1+cu128", "c++17"),
     ("2.4.0a0+git1234", "c++17")],
)
def test_cxx_standard_follows_torch(version, standard):
    assert cxx_standard(version) == standard


def test_cxx_standard_rejects_a_malformed_version():
    with pytest.raises(ValueError, match="MAJOR.MINOR"):
        cxx_standard("nightly")


@pytest.mark.parametrize("source", sorted(path.name for path in (ROOT / "csrc").glob("*.cpp")))
def test_extension_source_compiles_without_warnings_in_the_chosen_standard(source):
    """Every csrc/*.cpp with setup.py's -std and OpenMP flags: torch >= 2.10's headers warn under C++17."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C++ compiler ({compiler!r}) on PATH")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = [compiler, "-fsyntax-only", f"-std={cxx_standard(torch.__version__)}", "-Wall",
               *openmp_flags(sys.platform), *(f"-I{path}" for path in includes), str(ROOT / "csrc" / source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warning" not in result.stderr, result.stderr[-3000:]


def test_openmp_flags_per_platform():
    assert openmp_flags("linux") == ["-fopenmp"]
    assert openmp_flags("darwin") == [] and openmp_flags("win32") == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the OpenMP link is checked on Linux only")
def test_extension_shares_torchs_openmp_runtime():
    """Built with -fopenmp, the extension's at::parallel_for really runs in parallel; it needs libgomp.so.1, which
    must resolve to the runtime torch already loaded (one thread pool in the process, not two)."""
    from segformer_fast.ops import extension as ops

    if not ops.extension_available():
        pytest.skip("segformer_fast._C is not built")
    from segformer_fast import _C

    if shutil.which("ldd") is None:
        pytest.skip("no ldd on PATH")
    needed = subprocess.run(["ldd", _C.__file__], capture_output=True, text=True, timeout=60).stdout
    assert "libgomp" in needed, needed
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(runtimes) == 1, runtimes


# ----------------------------------------------------------------------------------------------------- version
def test_version_resolves_statically_without_torch():
    """setuptools reads segformer_fast.__version__ from the source: no import of the package (nor of torch)."""
    script = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch must not be imported to read the version')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from setuptools.config.expand import read_attr\n"
        "print(read_attr('segformer_fast.__version__', {'segformer_fast': 'segformer_fast'}, sys.argv[1]))\n"
        "assert 'segformer_fast' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == segformer_fast.__version__


def test_installed_metadata_carries_the_package_version():
    assert importlib.metadata.version("segformer-fast") == segformer_fast.__version__
