"""Install nanosar and build its MoE kernels (module nanosar._C) with torch.utils.cpp_extension.

    pip install torch numpy tifffile pybind11 ninja setuptools wheel
    pip install --no-build-isolation -e .          # the build needs the torch that will run it

Importing nanosar._C registers the custom operators torch.ops.nanosar.{gating, permute, combine, ...}
(csrc/bindings.cpp). The C++ CPU kernels are always built. The CUDA kernels are added when torch is a
CUDA build and a CUDA toolkit is found (CUDA_HOME, or nvcc on PATH); NANOSAR_CPU_ONLY=1 skips them. GPU
architectures come from TORCH_CUDA_ARCH_LIST, default "8.0;9.0+PTX": binaries for A100 and H100/H200,
plus PTX that the driver compiles for newer GPUs. On a GPU the build does not cover, the MoE falls back
to its PyTorch path with a note on stderr (nanosar/moe_ops.py, kernel_devices). NANOSAR_NO_EXTENSION=1
installs the pure Python package (the MoE then always takes the PyTorch path).
"""

import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def pip_cuda_include_dirs(torch):
    """Include folders of the CUDA libraries pip installs beside torch (site-packages/nvidia/*/include).

    torch's CUDA headers include cusparse.h, cublas_v2.h, ...; a minimal toolkit (nvcc and the runtime
    only) lacks them, while the nvidia-* wheels that a CUDA build of torch depends on ship them.
    """
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include")))


def extension_build():
    """(ext_modules, cmdclass) for nanosar._C, or ([], {}) when NANOSAR_NO_EXTENSION=1."""
    if os.environ.get("NANOSAR_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and os.environ.get("NANOSAR_CPU_ONLY") != "1"
    cxx_flags = ["-O3"]
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")  # +PTX: runs (JIT) on newer GPUs too
        ext = CUDAExtension(
            "nanosar._C",
            cpu_sources + cuda_sources,
            include_dirs=pip_cuda_include_dirs(torch),
            extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": ["-O3", "-DWITH_CUDA", "-lineinfo"]},
        )
    else:
        ext = CppExtension("nanosar._C", cpu_sources, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extension_build()

setup(
    name="nanosar",
    version="0.1.0",
    description="Minimal, readable CrossEarth-SAR: a physics-guided sparse-MoE ViT for SAR segmentation",
    packages=["nanosar"],
    python_requires=">=3.10",
    install_requires=["torch>=2.8", "numpy", "tifffile"],  # torch._grouped_mm appeared in 2.8
    extras_require={"test": ["pytest"], "build": ["pybind11", "ninja"], "plot": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
