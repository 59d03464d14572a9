#!/usr/bin/env bash
# Seeds the fuzz corpora with valid objects sealed under the fuzz targets' fixed keys (chunks,
# indexes, manifests, catalog segments, config, key slot, KMS key slot) and their payloads.
# Nothing binary is committed: run this before `RUSTC_BOOTSTRAP=1 cargo fuzz run <target>`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-../../target/fuzz-seeds}"
cargo run -q --example fuzz_seeds -- fuzz/corpus
ls fuzz/corpus/*/ | head
