"""The source distribution holds everything its own build needs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                               "*.so", ".pytest_cache", ".ruff_cache", "runs")  # fmt: skip


def test_sdist_holds_the_extension_sources(tmp_path):
    """An sdist without CMakeLists.txt and csrc/ could not be installed: pip's build of it ran
    CMake on a folder without its project (every install from a source release failed)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP)
    out = tmp_path / "dist"
    out.mkdir()
    code = "import sys\nfrom setuptools import build_meta as b\nprint(b.build_sdist(sys.argv[1]))"
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    name = run.stdout.strip().splitlines()[-1]
    with tarfile.open(out / name) as tar:
        held = {Path(*Path(m).parts[1:]).as_posix() for m in tar.getnames()}
    needed = {"CMakeLists.txt", "tests/conftest.py", "setup.py", "pyproject.toml"}
    needed |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir()
               if p.suffix in (".cpp", ".h")}  # fmt: skip
    assert needed <= held, sorted(needed - held)
    assert any(h.startswith("python/antdiff/presets/") for h in held)


def test_a_missing_pybind11_is_named(tmp_path):
    """Configuring without pybind11 (a --no-build-isolation build in an environment without it)
    says what to install, not only CMake's generic 'could not find a package configuration'."""
    local = Path(sys.executable).parent / "cmake"
    cmake = str(local) if local.exists() else shutil.which("cmake")
    assert cmake, "cmake is a build requirement (pip install cmake)"
    run = subprocess.run(
        [cmake, str(ROOT), "-DCMAKE_DISABLE_FIND_PACKAGE_pybind11=TRUE",
         f"-Dpybind11_DIR={tmp_path / 'none'}", f"-DPython_EXECUTABLE={sys.executable}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode != 0
    assert "pybind11 not found: `pip install pybind11`" in run.stderr + run.stdout
