"""mae_fast: fast masked autoencoders for microscopy. Metadata, dependencies and entry points: pyproject.toml.

This file holds what needs code:
- `kernels/` is installed as `mae_fast.kernels` (a different PyPI project owns the top-level name `kernels`);
- the C++ extension `mae_fast._C` (csrc/) is optional: it is built only when torch and a C++ compiler are available
  at build time, and the package works without it. pip builds in an isolated environment without torch unless told
  otherwise, so `pip install .` installs without it and says so in one line; `pip install --no-build-isolation .`
  (or `-e`) builds it against the installed torch. MAE_FAST_NO_EXT=1 skips it.
"""
import glob
import os
import sys

from setuptools import find_packages, setup

packages = [p for p in find_packages(include=["mae_fast", "mae_fast.*"])] + ["mae_fast.kernels"]
package_dir = {"mae_fast": "mae_fast", "mae_fast.kernels": "kernels"}
NOT_BUILT = ("mae_fast: C++ CPU kernels not built ({why}); the pure-PyTorch paths will run. To build them against "
             "the installed torch: pip install --no-build-isolation .")

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
if sources and os.environ.get("MAE_FAST_NO_EXT") != "1":
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(NOT_BUILT.format(why="torch is not importable at build time, e.g. in pip's isolated build environment"),
              file=sys.stderr)
    else:
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
            """Build the extension if possible; on any compiler error install without it.

            Objects go to one folder per Python and torch version under build/ (not the throw-away folder of an
            editable install), so a later build of the same tree -- `pip wheel`, a re-install -- recompiles only
            what changed (ninja compares sources, headers and flags)."""

            def finalize_options(self):
                if self.build_temp is None:
                    import sysconfig

                    import torch

                    tag = f"{sysconfig.get_platform()}-{sys.implementation.cache_tag}-torch{torch.__version__}"
                    self.build_temp = os.path.join("build", "temp-mae_fast", tag.replace("+", "_"))
                super().finalize_options()

            def run(self):
                try:
                    super().run()
                except Exception as err:  # noqa: BLE001 - optional extension
                    last = (str(err).strip().splitlines() or [type(err).__name__])[-1]
                    print(NOT_BUILT.format(why=f"build error: {last}"), file=sys.stderr)

        cmdclass = {"build_ext": OptionalBuildExtension}

setup(packages=packages, package_dir=package_dir, ext_modules=ext_modules, cmdclass=cmdclass)
