"""The stubs match the built module (stubtest), and typical user code passes mypy --strict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import candle_phi
import pytest

pytest.importorskip("mypy")


def run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def test_stubtest(tmp_path: Path) -> None:
    result = run("mypy.stubtest", "candle_phi._native", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_user_code_type_checks(tmp_path: Path) -> None:
    user_code = Path(__file__).parent / "typing" / "user_code.py"
    result = run("mypy", "--strict", "--no-incremental", user_code, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_user_code_is_caught(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from candle_phi import Phi3Generator\n"
        "def f(g: Phi3Generator) -> int:\n"
        "    return g.generate('x', temperature='hot').read()\n"
    )
    result = run("mypy", "--strict", "--no-incremental", bad, cwd=tmp_path)
    assert result.returncode == 1
    assert "temperature" in result.stdout and "return value" in result.stdout


def test_package_is_typed() -> None:
    package = Path(candle_phi.__file__).parent
    assert (package / "py.typed").exists() and (package / "_native.pyi").exists()
