"""Build the C++ extension ``segformer_fast._C``; everything else about the package is in pyproject.toml.

The extension is built from csrc/*.cpp always, and from csrc/cuda/*.cu as well when a CUDA toolkit and a CUDA
build of torch are present. torch must already be installed (build with ``pip install --no-build-isolation``).
Environment variables:

- ``SEGFORMER_FAST_SKIP_EXT=1``: build no extension (the package runs on its eager fallbacks).
- ``SEGFORMER_FAST_NO_CUDA=1``: build the C++ part only, even where CUDA is available.
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures to build for (default "8.0;9.0+PTX"); entries below 8.0 are dropped.
"""

import glob
import importlib.util
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_support():
    """build_support.py, loaded from its file: setuptools' PEP 517 backend does not put the project folder on
    sys.path, and putting it there would make the project's folders shadow installed packages of the same name
    (kernels/ against Hugging Face's ``kernels``, whose setuptools entry points every build loads)."""
    path = os.path.join(ROOT, "build_support.py")
    spec = importlib.util.spec_from_file_location("segformer_fast_build_support", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_support = _load_build_support()


def _extension_modules():
    if os.environ.get("SEGFORMER_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    try:
        import torch
    except ImportError:
        sys.exit(
            "segformer-fast builds its C++ extension against the torch already installed, and none is importable by "
            "this build (an isolated build, by default in pip, sees none): install torch first, then this project "
            "with `pip install --no-build-isolation .` (README, \"Installing into your own environment\")"
        )
    from torch.utils import cpp_extension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    if not cpp_sources:
        return [], {}
    want_cuda = (
        os.environ.get("SEGFORMER_FAST_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and bool(cuda_sources)
    )
    std_flag = f"-std={build_support.cxx_standard(torch.__version__)}"
    openmp = build_support.openmp_flags(sys.platform)
    cxx_flags = ["-O3", std_flag, *openmp]
    if want_cuda:
        arch_list, dropped = build_support.filter_cuda_arch_list(os.environ.get("TORCH_CUDA_ARCH_LIST"))
        if dropped:
            print(f"segformer-fast: not building for CUDA arch {', '.join(dropped)} (sm_80+ needed)", file=sys.stderr)
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list  # read by torch's BuildExtension for the -gencode flags
        extension = cpp_extension.CUDAExtension(
            "segformer_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("SEGFORMER_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", std_flag]},
            extra_link_args=openmp,
        )
    else:
        extension = cpp_extension.CppExtension("segformer_fast._C", cpp_sources, extra_compile_args=cxx_flags,
                                               extra_link_args=openmp)
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(ext_modules=ext_modules, cmdclass=cmdclass)
