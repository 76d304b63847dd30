"""Build antdiff: the pure-Python packages plus the antdiff._C extension via CMake + ninja."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _tool(name: str) -> str:
    """A build tool from this Python's environment (pip's cmake / ninja) or else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: `pip install {name}` (or install it system-wide)")
    return found


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build one CMake target, then drop the module where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        cmake = _tool("cmake")
        configure = [
            cmake,
            str(ROOT),
            "-G",
            "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
        ]
        try:
            import pybind11

            configure.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(
    package_dir={"antdiff": "python/antdiff", "ant_kernels": "ant_kernels"},
    # every subpackage (engine, mtl, models, ...): a wheel or non-editable install needs them
    packages=[*find_packages("python"), *find_packages(".", include=["ant_kernels*"])],
    package_data={"antdiff": ["presets/*.yaml", "py.typed"]},
    ext_modules=[CMakeExtension("antdiff._C")],
    cmdclass={"build_ext": CMakeBuild},
)
