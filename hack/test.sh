#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: the README's test command.
#
#   hack/test.sh            formatting, lints, then every test target (unit, dev-mode
#                           integration, the cluster tests against a real kube-apiserver, and
#                           the chart on a node that runs pods)
#
# It installs what it needs: the Rust crates (cargo fetches them), the Go-built control plane
# and node (kube-apiserver, etcd, kubectl, helm, kubelet, kube-proxy, controller-manager,
# scheduler) through hack/control-plane.sh, containerd, runc and the CNI plugins from Debian
# (hack/node.sh install, as root), the OpenClaw gateway (Node 24 and openclaw from npm, through
# hack/openclaw.sh), cached outside the repo so the second run takes seconds; and it builds the
# image (hack/image.sh) the node tests install.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n== %s ==\n' "$*" >&2; }

step "control plane and node (hack/node.sh install: apt packages, Go-built binaries, images)"
# The node tests (tests/k8s_node.rs) run pods, which needs root; as another user they fail
# and say so.
if [ "$(id -u)" = 0 ]; then
  bash hack/node.sh install >/dev/null
else
  bash hack/control-plane.sh install >/dev/null
fi

step "the OpenClaw gateway (hack/openclaw.sh install: Node 24 and openclaw from npm)"
# The node.invoke tests run the real gateway; cached like the control plane.
bash hack/openclaw.sh install

step "the image (hack/image.sh, a release build)"
bash hack/image.sh target/images/claw-secrets.tar

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
