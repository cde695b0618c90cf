"""Packaging: one distribution whose wheel maps integrations/ to mldbg_callbacks.integrations."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_integrations_importable_from_editable_install():
    import mldbg_callbacks.integrations as integrations

    assert Path(integrations.__file__).resolve().parent == ROOT / "integrations"


def test_regular_wheel_contains_integrations_under_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, timeout=300)
    wheel = next(tmp_path.glob("mldbg_callbacks-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "mldbg_callbacks/integrations/__init__.py" in names
    assert "mldbg_callbacks/integrations/torch_model.py" in names
    assert "mldbg_callbacks/training.py" in names and "mldbg_callbacks/evaluator.py" in names
    assert not any(name.startswith("integrations/") for name in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for extra in ("lightning", "keras", "ultralytics", "mmengine", "transformers", "server", "all", "dev"):
        assert f"Provides-Extra: {extra}" in metadata
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "mldbg = mldbg_callbacks.cli:main" in entry_points
    # a regular (non-editable) install of that wheel imports the integrations from inside the package
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300)
    code = ("import mldbg_callbacks.integrations as i, mldbg_callbacks.integrations.torch_model as t, sys;"
            "print(i.__file__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == str(target / "mldbg_callbacks" / "integrations" / "__init__.py")
