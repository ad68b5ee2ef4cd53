#!/usr/bin/env bash
# The release wheel: abi3 (one wheel for CPython >= 3.10), manylinux_2_28 on Linux, written
# into dist/. The same command runs in CI (.ci/run) and in the release workflow's Linux
# x86-64 job. It needs Rust and maturin; installing the wheel needs neither.
#   bash scripts/build_wheel.sh            # then: pip install dist/candle_phi-*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}  # CI passes its virtual environment's
# An absolute path: zig's compiler wrappers run it from other directories.
case "$PYTHON" in */*) PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")" ;; esac
# maturin finds zig as `python3 -m ziglang` through PATH: put that environment first.
PATH="$(dirname "$(command -v "$PYTHON")"):$PATH"
export PATH
"$PYTHON" -m pip install -q 'maturin>=1.9.4,<2' auditwheel ziglang
rm -rf dist
# No -C target-cpu: the wheel must run on every x86-64; the kernels pick AVX2 / AVX-512 /
# VNNI code paths at run time. On Linux, zig (from PyPI's ziglang) links against glibc 2.28
# whatever the build machine's glibc, where no manylinux container can be pulled.
args=(--release --out dist)
if [ "$(uname -s)" = Linux ]; then
    args+=(--compatibility manylinux_2_28 --zig)
fi
"$PYTHON" -m maturin build "${args[@]}"
"$PYTHON" -m auditwheel show dist/*.whl
ls -l dist/
