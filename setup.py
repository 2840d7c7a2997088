"""mae_fast: fast masked autoencoders for microscopy.

`kernels/` is installed as `mae_fast.kernels` (a different PyPI project owns the top-level name `kernels`).
The C++ extension `mae_fast._C` (csrc/) is optional: it is built only when torch and a C++ compiler are
available at build time (install with `--no-build-isolation`), and the package works without it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["mae_fast", "mae_fast.*"])] + ["mae_fast.kernels"]
package_dir = {"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"}

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("MAE_FAST_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension

        openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
        ext_modules = [
            CppExtension(
                "mae_fast._C",
                sources,
                extra_compile_args=["-O3", "-march=x86-64-v2"] + openmp if os.uname().machine == "x86_64" else ["-O3"] + openmp,
                extra_link_args=openmp,
            )
        ]

        class OptionalBuildExtension(BuildExtension):
            """Build the extension if possible; on any compiler error install without it."""

            def run(self):
                try:
                    super().run()
                except Exception as err:  # noqa: BLE001 - optional extension
                    print(f"mae_fast: C++ extension not built ({err}); the pure-PyTorch paths will be used.")

        cmdclass = {"build_ext": OptionalBuildExtension}
    except ImportError:
        print("mae_fast: torch not importable at build time; skipping the C++ extension.")

setup(
    name="mae_fast",
    version="0.1.0",
    description="Fast masked autoencoders (MAE, CA-MAE) for Cell Painting microscopy",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=packages,
    package_dir=package_dir,
    python_requires=">=3.11",
    # Lower bounds are the oldest versions CI proves (constraints-oldest.txt, `make test-oldest`); the versions CI
    # proves at the top are in constraints.txt.
    install_requires=[
        "torch>=2.11",
        "numpy>=1.26",
        "pandas>=2.2",
        "pyarrow>=17",
        "safetensors>=0.4.5",
        "tqdm>=4.66",
        "matplotlib>=3.9",
        "pillow>=10.4",
        "tifffile>=2024.9.20",
        "pyyaml>=6.0.2",
        "imagecodecs>=2024.9.22",  # blosc2 tiles of `mae-fast pack`, fast PNG / JPEG 2000 decoding
    ],
    extras_require={
        # copairs: the reference our mAP is checked against in the tests
        "test": ["pytest>=9.2", "pytest-benchmark>=5.3", "pytest-xdist>=3.8", "hypothesis>=6.170", "timm>=1.0.31", "copairs>=0.5.5"],
        # the CellProfiler-style baseline (cp-measure's centrosome needs pillow < 12). EFAAR's relationship databases
        # come from `pip install --no-deps efaar-benchmarking==1.0` (its own dependencies are heavy and unused)
        "eval": ["scikit-image>=0.26", "cp-measure>=0.3"],
        "dali": ["nvidia-dali-cuda130>=2.4"],
        "flash": ["flash-attn"],
        # FlashAttention-4: pure Python on NVIDIA's CUTLASS DSL (SM90+), no compiler needed; preferred when present
        "flash4": ["flash-attn-4"],
    },
    entry_points={"console_scripts": ["mae-fast=mae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
