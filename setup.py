"""embtables: compressed, sharded embedding tables for CTR training.

One namespace is installed: `embtables` (the library), `embtables.kernels` (from kernels/)
and `embtables.pipelines` (from pipelines/).
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The fast CPU lookup (kernels/cpu_fused.py calls it through ctypes; no torch headers needed).
# optional=True: when it cannot compile, the install still succeeds and the torch reference is used.
# Built on the machine that installs it, so -march=native (AVX-512 where present); set
# EMBTABLES_CPU_ARCH (e.g. x86-64-v2) for a build that must run on other CPUs. -fopenmp: the
# kernels run on torch's OpenMP threads (kernels/csrc/parallel.h); a compiler without OpenMP
# gets a single-threaded build rather than none.
cpu_fused = Extension(
    "embtables.kernels._cpu_fused",
    sources=["kernels/csrc/cpu_fused.cpp", "kernels/csrc/interaction.cpp"],
    depends=["kernels/csrc/parallel.h"],
    extra_compile_args=["-O3", "-fopenmp", "-pthread", "-std=c++17",
                        f"-march={os.environ.get('EMBTABLES_CPU_ARCH', 'native')}"],
    extra_link_args=["-fopenmp", "-pthread"],
    optional=True,
)


class BuildWithoutOpenMPFallback(build_ext):
    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as error:  # CompileError / LinkError: retry once without OpenMP
            if "-fopenmp" not in ext.extra_compile_args:
                raise
            print(f"warning: building {ext.name} without OpenMP ({error}); its kernels will use one thread")
            ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
            ext.extra_link_args = [a for a in ext.extra_link_args if a != "-fopenmp"]
            super().build_extension(ext)


def set_pins(name: str) -> list[str]:
    """The requirements requirements-<name>.txt adds to the shared requirements.txt."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), f"requirements-{name}.txt")) as f:
        lines = (line.split("#")[0].strip() for line in f)
        return [line for line in lines if line and not line.startswith("-")]


setup(
    name="embtables",
    version="0.1.0",
    description="Train CTR models with compressed, sharded embedding tables",
    python_requires=">=3.10",
    packages=["embtables", "embtables.methods", "embtables.models", "embtables.serving",
              "embtables.kernels", "embtables.kernels.triton", "embtables.pipelines",
              *(f"embtables.pipelines.{job}" for job in ("data", "train", "serve", "bench", "cli"))],
    package_dir={"embtables": "embtables",
                 "embtables.kernels": "kernels",
                 "embtables.pipelines": "pipelines"},
    install_requires=[
        "torch==2.13.0", "ray[data,train]==2.60.0",
        "pyarrow", "numpy", "PyYAML", "tqdm", "safetensors", "matplotlib",
        "tensordict", "torchmetrics", "pyre-extensions", "iopath",
        # torchrec==1.8.0 is installed with --no-deps by the Makefile (see README, "Installing")
    ],
    # The FBGEMM build for torch 2.13, as pinned by the two install sets: `pip install .[cpu]`
    # on CPU-only machines, `.[cuda]` on CUDA machines (never both: each installs `fbgemm_gpu`).
    extras_require={"cpu": set_pins("cpu"), "cuda": set_pins("cuda"), "test": ["pytest", "triton"]},
    ext_modules=[cpu_fused],
    cmdclass={"build_ext": BuildWithoutOpenMPFallback},
    entry_points={"console_scripts": ["embtables=embtables.pipelines.cli.main:main"]},
)
