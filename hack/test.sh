#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: the README's test command.
#
#   hack/test.sh            formatting, lints, then every test target (unit, dev-mode
#                           integration, and the cluster tests against a real kube-apiserver)
#
# It installs what it needs: the Rust crates (cargo fetches them) and the Go-built control
# plane (kube-apiserver, etcd, kubectl, helm) through hack/control-plane.sh, cached outside
# the repo so the second run takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*" >&2; }

if [ -f hack/control-plane.sh ]; then
  step "control plane binaries (hack/control-plane.sh install)"
  bash hack/control-plane.sh install >/dev/null
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings

step "cargo test --all-targets --no-fail-fast"
# --no-fail-fast: one failing target must not hide the results of the others.
cargo test --all-targets --locked --no-fail-fast

step "cargo test --doc"
# --all-targets does not include doc tests: the examples in the API docs run here.
cargo test --doc --locked
