# The claw-secrets image: one binary, run as `claw-secrets operator` (a Deployment) or
# `claw-secrets agent` (a DaemonSet) by charts/claw-secrets.
#
#   docker build -t ghcr.io/clawbernetes/claw-secrets:dev .
#   docker run --rm ghcr.io/clawbernetes/claw-secrets:dev --help
#
# A glibc release build on Debian 12 (bookworm), copied into distroless/cc-debian12, which has
# the same glibc (2.36) and the only shared libraries the binary links (libc, libm, libgcc_s):
# no shell, no package manager. Not a static musl build: musl's allocator is known to be much
# slower under multi-threaded, allocation-heavy load such as the HTTP benchmarks'
# (BENCHMARKS.md; not measured for this image), and with rustls and ring there is no OpenSSL to
# link either way.
#
# Runs as uid/gid 65532 (distroless "nonroot"). The only path it writes is the agent's
# --data-dir (default /var/lib/claw-secrets, the chart's hostPath); the operator writes nothing
# to disk, so both run with readOnlyRootFilesystem.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The release profile keeps line tables (94 MB binary); the image drops debug info but keeps
# the symbols, so a backtrace still names functions (19 MB). Set before both builds below, as
# it is part of what cargo compiled the dependencies with.
ENV CARGO_PROFILE_RELEASE_STRIP=debuginfo

# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, not on every source edit. (The benches are declared in Cargo.toml, so
# cargo wants files for them even when it does not build them.)
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/crypto.rs \
    && echo 'fn main() {}' > benches/http.rs \
    && cargo build --release --locked --bin claw-secrets \
    && rm -rf src benches

# The crate itself. COPY keeps the files' own modification times, which can be older than the
# stub build above: touching the crate roots makes cargo rebuild it rather than ship the stub.
COPY src ./src
COPY benches ./benches
COPY crds ./crds
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin claw-secrets \
    && install -D -m 0755 target/release/claw-secrets /out/claw-secrets \
    && /out/claw-secrets --version > /tmp/version \
    && grep -q '^claw-secrets ' /tmp/version

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="claw-secrets" \
      org.opencontainers.image.description="Secrets and configuration manager for Clawbernetes nodes: operator and node agent" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/claw-secrets /claw-secrets
# Numeric, so that the kubelet can check runAsNonRoot without a runAsUser in the pod spec.
USER 65532:65532
# 7443: the agent's node.invoke (plain HTTP); 8080: the operator's /metrics, /healthz, /readyz.
EXPOSE 7443 8080
ENTRYPOINT ["/claw-secrets"]
CMD ["--help"]
