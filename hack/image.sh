#!/usr/bin/env bash
# The claw-secrets image without Docker: the release binary and only what it needs at run time
# (glibc's loader, libc, libm, libgcc_s; CA certificates; a passwd naming uid 65532 "nonroot"),
# laid out as ./Dockerfile's distroless image is, written as an OCI image tar that
# `ctr images import` (and `docker load`, `podman load`) take. The Dockerfile stays the way to
# build for a registry; this is how the node tests (hack/node.sh) get the image.
#
#   hack/image.sh OUT.tar [BINARY]
#
# BINARY defaults to target/release/claw-secrets, built here (cargo build --release --locked).
# The image is named ghcr.io/clawbernetes/claw-secrets:<crate version>, the chart's default.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: hack/image.sh OUT.tar [BINARY]}"
binary="${2:-}"
log() { printf '[image] %s\n' "$*" >&2; }

if [[ -z "$binary" ]]; then
    # Symbols kept, debug info dropped: as the Dockerfile builds it.
    (cd "$ROOT" && CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo build --release --locked --bin claw-secrets >&2)
    binary="$ROOT/target/release/claw-secrets"
fi
version="$(awk -F'"' '/^version = / { print $2; exit }' "$ROOT/Cargo.toml")"
name="ghcr.io/clawbernetes/claw-secrets:$version"

mkdir -p "$(dirname "$out")"
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
install -D -m 0755 "$binary" "$rootfs/claw-secrets"
strip --strip-debug "$rootfs/claw-secrets"
# The shared libraries the binary links, and the loader, at the paths it asks for.
for lib in $(ldd "$binary" | awk '/=>/ { print $3 } /ld-linux/ && !/=>/ { print $1 }'); do
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
mkdir -p "$rootfs/tmp" "$rootfs/home/nonroot"
chmod 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
chown 65532:65532 "$rootfs/home/nonroot"
chmod 0700 "$rootfs/home/nonroot"
"$rootfs/claw-secrets" --version >/dev/null || { log "the binary does not run"; exit 1; }
python3 "$ROOT/hack/oci-image.py" "$out" "$name" "$rootfs" '{
    "User": "65532:65532",
    "Entrypoint": ["/claw-secrets"],
    "Cmd": ["--help"],
    "WorkingDir": "/home/nonroot",
    "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],
    "ExposedPorts": {"7443/tcp": {}, "8080/tcp": {}}
}' >&2
log "$name -> $out ($(du -h "$out" | cut -f1))"
