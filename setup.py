"""Install nanosar: `pip install -e .` (tests: `pip install -e ".[test]"`)."""

from setuptools import setup

setup(
    name="nanosar",
    version="0.1.0",
    description="Minimal, readable reimplementation of CrossEarth-SAR, the physics-guided sparse-MoE ViT for SAR segmentation",
    packages=["nanosar"],
    python_requires=">=3.10",
    install_requires=["torch>=2.8", "numpy", "tifffile"],  # torch._grouped_mm appeared in 2.8
    extras_require={"test": ["pytest"], "build": ["pybind11", "ninja"]},
)
