#!/usr/bin/env bash
# The whole test suite: installs the peers, then formatting, lints and every test of the workspace.
# Usage: tests/run.sh [extra args passed to the test runner, e.g. a test-name filter]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "peers (tests/peers/install.sh)"
tests/peers/install.sh

for c in cargo rustfmt cargo-clippy; do
  command -v "$c" >/dev/null || { echo "tests/run.sh: $c not found (needs the Rust toolchain with rustfmt and clippy)" >&2; exit 1; }
done

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "tests"
if command -v cargo-nextest >/dev/null; then
  cargo nextest run --workspace --no-fail-fast "$@"
  step "doc tests"
  cargo test --workspace --doc "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
