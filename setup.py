"""embtables: compressed, sharded embedding tables for CTR training.

One namespace is installed: `embtables` (the library), `embtables.kernels` (from kernels/)
and `embtables.pipelines` (from pipelines/).
"""
from setuptools import setup

setup(
    name="embtables",
    version="0.1.0",
    description="Train CTR models with compressed, sharded embedding tables",
    python_requires=">=3.10",
    packages=["embtables", "embtables.methods", "embtables.models",
              "embtables.kernels", "embtables.pipelines"],
    package_dir={"embtables": "embtables",
                 "embtables.kernels": "kernels",
                 "embtables.pipelines": "pipelines"},
    install_requires=[
        "torch==2.13.0", "ray[data,train]==2.60.0",
        "pyarrow", "numpy", "PyYAML", "tqdm", "safetensors", "matplotlib",
        "tensordict", "torchmetrics", "pyre-extensions", "iopath",
        # torchrec==1.8.0 is installed with --no-deps by the Makefile (see requirements.txt)
    ],
    extras_require={
        # The FBGEMM build matching torch 2.13: CPU-only machines take `cpu`, CUDA machines `gpu`.
        "cpu": ["fbgemm-gpu-cpu==1.8.0"],
        # CUDA machines: the same pairing with the CUDA builds (install torch from the CUDA index).
        "gpu": ["torch==2.13.0", "fbgemm-gpu==1.8.0", "triton"],
        "test": ["pytest", "triton"],
    },
    entry_points={"console_scripts": ["embtables=embtables.cli:main"]},
)
