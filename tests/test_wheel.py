"""The release wheel (scripts/build_wheel.sh) installs and runs where there is no compiler.

CI builds the wheel and names it in CANDLE_PHI_WHEEL; without it these tests skip, unless
CANDLE_PHI_REQUIRE_WHEEL=1 (set in CI) makes the missing wheel a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

WHEEL = os.environ.get("CANDLE_PHI_WHEEL")
TOOLCHAIN = ("cargo", "rustc", "cc", "gcc", "clang")


@pytest.fixture(scope="module")
def wheel() -> Path:
    if not WHEEL:
        if os.environ.get("CANDLE_PHI_REQUIRE_WHEEL") == "1":
            pytest.fail("CANDLE_PHI_WHEEL does not name the wheel built by scripts/build_wheel.sh")
        pytest.skip("no release wheel given (CANDLE_PHI_WHEEL)")
    path = Path(WHEEL)
    assert path.is_file(), path
    return path


def test_the_wheel_is_abi3_manylinux_2_28(wheel: Path) -> None:
    name = wheel.name
    assert "-cp310-abi3-" in name, name
    assert "manylinux_2_28_x86_64" in name or "manylinux2014_x86_64" in name, name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert any(n.startswith("candle_phi/_native") and n.endswith(".so") for n in names)
    assert "candle_phi/py.typed" in names
    auditwheel = shutil.which("auditwheel") or str(Path(sys.executable).parent / "auditwheel")
    if not Path(auditwheel).exists():
        pytest.skip("auditwheel is not installed")
    shown = subprocess.run(
        [auditwheel, "show", str(wheel)], capture_output=True, text=True, check=True
    ).stdout
    assert (
        'consistent with the following platform tag: "manylinux_2_28_x86_64"'
        in shown.replace("\n", " ")
        or "manylinux_2_28_x86_64" in shown
    ), shown


def test_installs_and_generates_without_a_toolchain(
    wheel: Path, tmp_path: Path, model_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    bin_dir = venv / "bin"
    # Only the venv's own programs: no cargo, rustc or C compiler can be found.
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "PIP_NO_INDEX": "1"}
    for tool in TOOLCHAIN:
        assert shutil.which(tool, path=env["PATH"]) is None, tool
    subprocess.run(
        [str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
        check=True,
        env=env,
    )
    script = (
        "import sys, candle_phi\n"
        "gen = candle_phi.Phi3Generator(sys.argv[1])\n"  # the GGUF's own tokenizer
        "s = gen.generate('<|user|>\\nHi<|end|>\\n<|assistant|>', max_tokens=6, seed=1)\n"
        "text = ''.join(s)\n"
        "assert s.generated_tokens == 6, s.generated_tokens\n"
        "print(candle_phi.__file__)\n"
    )
    run = subprocess.run(
        [str(bin_dir / "python"), "-c", script, str(model_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # not the checkout, whose python/ must not shadow the wheel
    )
    assert run.returncode == 0, run.stderr
    assert str(venv) in run.stdout, run.stdout
    for kernels in ("scalar", "candle"):
        checked = subprocess.run(
            [str(bin_dir / "python"), "-c", script, str(model_path)],
            capture_output=True,
            text=True,
            env={**env, "CANDLE_PHI_KERNELS": kernels},
            cwd=tmp_path,
        )
        assert checked.returncode == 0, (kernels, checked.stderr)
