"""What ``pip install`` puts in site-packages: one package, ``maskx_jax``, with every module of the checkout's
``maskx_jax/``, ``convert/`` (as ``maskx_jax.convert``) and ``configs/`` (as ``maskx_jax.configs``), and no
top-level ``convert`` or ``configs``. Built as a wheel from this checkout (no network: no build isolation)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import zipfile

from tests.resources import ROOT


def _expected() -> set[str]:
    names = set()
    for folder, package in (("maskx_jax", "maskx_jax"), ("convert", "maskx_jax/convert"),
                            ("configs", "maskx_jax/configs")):
        for path in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True):
            names.add(package + "/" + os.path.relpath(path, os.path.join(ROOT, folder)).replace(os.sep, "/"))
    return names


def test_the_wheel_holds_every_module_under_one_package(tmp_path):
    # A copy of the sources, so no build/ folder of an earlier build can fill in what pyproject.toml leaves out.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for folder in ("maskx_jax", "convert", "configs"):
        shutil.copytree(os.path.join(ROOT, folder), src / folder, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {n for n in names if n.endswith(".py")}
    missing = _expected() - modules
    assert not missing, f"modules the wheel leaves out (add their package to pyproject.toml): {sorted(missing)}"
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"maskx_jax"}, tops
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "maskx-convert = maskx_jax.convert.from_torch:main" in entry_points
