"""Build and install segformer-fast.

The C++ extension ``segformer_fast._C`` is built from csrc/*.cpp always, and from csrc/cuda/*.cu as well when
a CUDA toolkit and a CUDA build of torch are present. Environment variables:

- ``SEGFORMER_FAST_SKIP_EXT=1``: build no extension (the package runs on its eager fallbacks).
- ``SEGFORMER_FAST_NO_CUDA=1``: build the C++ part only, even where CUDA is available.
- ``TORCH_CUDA_ARCH_LIST``: CUDA architectures to build for (default "8.0;9.0").
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extension_modules():
    if os.environ.get("SEGFORMER_FAST_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
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
    cxx_flags = ["-O3", "-std=c++17"]
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        extension = cpp_extension.CUDAExtension(
            "segformer_fast._C",
            cpp_sources + cuda_sources,
            define_macros=[("SEGFORMER_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
        )
    else:
        extension = cpp_extension.CppExtension(
            "segformer_fast._C", cpp_sources, extra_compile_args=cxx_flags
        )
    return [extension], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_modules()

setup(
    name="segformer-fast",
    version="0.1.0",
    description="A fast, numerically checked SegFormer inference engine for PyTorch",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["segformer_fast", "segformer_fast.kernels"],
    package_dir={"segformer_fast": "segformer_fast", "segformer_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "Pillow",
        "tqdm",
        "huggingface_hub",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "scaleout": ["ray[data]>=2.9"],
        "test": ["pytest", "pytest-benchmark", "transformers>=4.40", "hypothesis", "ray[data]>=2.9"],
    },
    entry_points={"console_scripts": ["segformer-fast=segformer_fast.cli:main"]},
)
