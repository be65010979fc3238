#!/usr/bin/env bash
# The container image and the Helm chart on a real kind cluster, then the cluster test suite
# against that cluster. For a machine with Docker; CI has no Docker engine and never runs this.
#
#   hack/kind-e2e.sh [--name NAME] [--keep] [--skip-tests] [-- TEST_ARGS...]
#
#   --name NAME       kind cluster name (default claw-secrets-e2e); an existing cluster of that
#                     name is reused, and then never deleted (it must have no claw-secrets
#                     release: the node test installs its own)
#   --keep            keep the cluster this run created (default: delete it at the end)
#   --skip-tests      stop after the node test; do not run the rest of the suite
#   -- TEST_ARGS      passed to the test binaries of step 5, e.g. `-- access_matrix --nocapture`
#
# Environment: KIND_NODE_IMAGE (kind's --image, default: kind's own), IMAGE_REPOSITORY (default
# ghcr.io/clawbernetes/claw-secrets).
#
# What it does:
#   1. Checks for docker (and a running engine), kind, kubectl, helm and cargo.
#   2. Creates the kind cluster (one node), or reuses it. A cluster this script creates also
#      accepts two static bearer tokens for the human test users alice and bob (an API server
#      --token-auth-file, as hack/control-plane.sh sets up), which the cluster tests need; the
#      tokens stay in ${XDG_CACHE_HOME:-~/.cache}/claw-secrets/kind/NAME/ for later runs. The
#      kubeconfig is written there too: ~/.kube/config is left alone.
#   3. Builds the image from ./Dockerfile under the chart's default name
#      (IMAGE_REPOSITORY:appVersion) and loads it into the cluster with `kind load`.
#   4. Runs tests/k8s_node.rs on the kind node: the same test CI runs on the node hack/node.sh
#      starts (helm install --wait, probes, in-cluster credentials, the runtime's
#      securityContext, the hostPort, the pod proxy, the hostPath store with the pods cut off
#      from the API server, the examples, leader failover, upgrade, uninstall, reinstall), with
#      CLAW_NODE_KUBECONFIG and CLAW_NODE_EXEC="docker exec NAME-control-plane". It removes
#      what it installed when it passes. It calls the agent's hostPort at the node's address,
#      so it needs a Linux host, where the kind node's address is reachable (Docker Desktop's
#      is not); the examples' pods pull curlimages/curl from Docker Hub.
#   5. Runs the rest of the cluster test suite against the cluster:
#        KUBECONFIG_E2E=<kubeconfig> cargo test --test 'k8s_*'
#      with the ServiceMonitor CRD applied first (from the pinned Prometheus Operator module
#      that hack/control-plane.sh install fetches), so the chart's ServiceMonitor is validated
#      by the API server.
#
# What step 5 exercises, and what it does not: its test binaries start their own `claw-secrets
# operator` and `agent` processes on this machine (the cargo-built binary, with the kind
# kubeconfig), and register Node objects of their own; kind contributes a real API server
# (TokenReview, SubjectAccessReview, RBAC, CRD validation, Events). Tests that stop and start
# the API server or read etcd's files need the local control plane, so they are left out by
# name (LOCAL_ONLY).
set -euo pipefail

if ((BASH_VERSINFO[0] < 4)); then
    echo "hack/kind-e2e.sh needs bash 4 or newer (macOS: brew install bash)" >&2
    exit 1
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHART="$ROOT/charts/claw-secrets"

NAME=claw-secrets-e2e
KEEP=0
SKIP_TESTS=0
TEST_ARGS=()
REPOSITORY="${IMAGE_REPOSITORY:-ghcr.io/clawbernetes/claw-secrets}"
TIMEOUT=180

log() { printf '[kind-e2e] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}
usage() { # EXIT_CODE
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit "$1"
}

while (($#)); do
    case "$1" in
    --name) NAME="${2:?--name needs a value}" && shift ;;
    --keep) KEEP=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    -h | --help) usage 0 ;;
    --) shift && TEST_ARGS=("$@") && break ;;
    *) log "unknown argument: $1" && usage 2 ;;
    esac
    shift
done

STATE="${XDG_CACHE_HOME:-$HOME/.cache}/claw-secrets/kind/$NAME"
KUBECONFIG_FILE="$STATE/kubeconfig"
TOKENS="$STATE/auth/tokens.csv"

# ---------------------------------------------------------------------------------------------
# 1. Prerequisites
# ---------------------------------------------------------------------------------------------

# kubectl and helm may come from hack/control-plane.sh's cache (`hack/control-plane.sh install`).
if ! command -v kubectl >/dev/null || ! command -v helm >/dev/null; then
    cp_bin="$(bash "$ROOT/hack/control-plane.sh" bin-dir 2>/dev/null || true)"
    if [[ -n "$cp_bin" && -x "$cp_bin/kubectl" && -x "$cp_bin/helm" ]]; then
        PATH="$PATH:$cp_bin"
    fi
fi

missing=()
command -v docker >/dev/null || missing+=("docker: install Docker Engine or Docker Desktop")
command -v kind >/dev/null ||
    missing+=("kind: see the kind quick start, e.g. \`go install sigs.k8s.io/kind@latest\`")
command -v kubectl >/dev/null ||
    missing+=("kubectl: install it, or build it with \`hack/control-plane.sh install\` (needs Go)")
command -v helm >/dev/null ||
    missing+=("helm (v3): install it, or build it with \`hack/control-plane.sh install\` (needs Go)")
command -v cargo >/dev/null || missing+=("cargo: install Rust (stable, 1.89 or newer)")
if ((${#missing[@]})); then
    log "missing prerequisites:"
    for m in "${missing[@]}"; do log "  - $m"; done
    exit 1
fi
docker info >/dev/null 2>&1 ||
    die "docker is installed but its engine does not answer (\`docker info\` failed): start Docker, or check that this user may use it"
[[ -f "$CHART/Chart.yaml" ]] || die "no Helm chart at $CHART (charts/claw-secrets/Chart.yaml)"
[[ -f "$ROOT/Dockerfile" ]] || die "no Dockerfile at $ROOT"

kc() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }
cluster_exists() {
    local clusters
    clusters="$(kind get clusters 2>/dev/null || true)"
    grep -qx "$NAME" <<<"$clusters"
}

# ---------------------------------------------------------------------------------------------
# Cleanup: whatever happens, delete the cluster if this run created it and --keep was not
# given.
# ---------------------------------------------------------------------------------------------

CREATED=0

cleanup() {
    local rc=$?
    if ((CREATED)) && ((KEEP == 0)); then
        if ((rc != 0)); then
            log "failed; deleting cluster $NAME (rerun with --keep to look into it)"
        fi
        kind delete cluster --name "$NAME" >/dev/null 2>&1 || true
    elif cluster_exists; then
        log "cluster $NAME is still up: KUBECONFIG=$KUBECONFIG_FILE; delete it with: kind delete cluster --name $NAME"
    fi
    exit "$rc"
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# 2. The cluster
# ---------------------------------------------------------------------------------------------

mkdir -p "$STATE"
chmod 700 "$STATE"

random_token() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

if cluster_exists; then
    log "reusing kind cluster $NAME (it is kept at the end)"
    kind get kubeconfig --name "$NAME" >"$KUBECONFIG_FILE"
else
    log "creating kind cluster $NAME"
    mkdir -p "$STATE/auth"
    (
        umask 077
        for user in alice bob; do
            printf '%s,%s,uid-%s,"claw-secrets-test:humans"\n' "$(random_token)" "$user" "$user"
        done >"$TOKENS"
    )
    # The token file reaches the API server as in hack/control-plane.sh: a directory mounted
    # into the node container, then into the kube-apiserver static pod. The patch has no
    # apiVersion, so it applies whichever kubeadm config version kind generates.
    cat >"$STATE/kind.yaml" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
- role: control-plane
  extraMounts:
  - hostPath: $STATE/auth
    containerPath: /etc/claw-secrets-e2e
    readOnly: true
  kubeadmConfigPatches:
  - |
    kind: ClusterConfiguration
    apiServer:
      extraArgs:
        token-auth-file: /etc/claw-secrets-e2e/tokens.csv
      extraVolumes:
      - name: claw-secrets-e2e
        hostPath: /etc/claw-secrets-e2e
        mountPath: /etc/claw-secrets-e2e
        readOnly: true
        pathType: Directory
EOF
    image_args=()
    [[ -n "${KIND_NODE_IMAGE:-}" ]] && image_args=(--image "$KIND_NODE_IMAGE")
    CREATED=1
    kind create cluster --name "$NAME" --config "$STATE/kind.yaml" \
        --kubeconfig "$KUBECONFIG_FILE" --wait "${TIMEOUT}s" ${image_args[@]+"${image_args[@]}"}
fi
chmod 600 "$KUBECONFIG_FILE"
kc get --raw /readyz >/dev/null || die "the API server of cluster $NAME is not ready"

# The human test users: from the environment, else from the token file of the run that created
# the cluster. Check that the API server accepts them (as themselves: no client certificate).
server="$(kc config view --minify -o jsonpath='{.clusters[0].cluster.server}')"
empty_kubeconfig="$STATE/empty-kubeconfig"
: >"$empty_kubeconfig"
token_of() { [[ -f "$TOKENS" ]] && awk -F, -v u="$1" '$2 == u { print $1; exit }' "$TOKENS"; }
CLAW_TEST_TOKEN_ALICE="${CLAW_TEST_TOKEN_ALICE:-$(token_of alice || true)}"
CLAW_TEST_TOKEN_BOB="${CLAW_TEST_TOKEN_BOB:-$(token_of bob || true)}"
export CLAW_TEST_TOKEN_ALICE CLAW_TEST_TOKEN_BOB
for user in alice bob; do
    var="CLAW_TEST_TOKEN_${user^^}"
    if [[ -z "${!var}" ]] ||
        ! kubectl --kubeconfig "$empty_kubeconfig" --server "$server" --insecure-skip-tls-verify \
            --token "${!var}" get --raw /version >/dev/null 2>&1; then
        log "warning: the API server of $NAME does not accept a token for the test user $user:"
        log "  the cluster tests that need human users will fail. Delete the cluster"
        log "  (kind delete cluster --name $NAME) and rerun, so that this script creates it,"
        log "  or set $var to a token of a user named $user with no RBAC grants."
    fi
done

# ---------------------------------------------------------------------------------------------
# 3. The image, under the name the chart uses by default
# ---------------------------------------------------------------------------------------------

APP_VERSION="$(awk -F'"' '/^appVersion:/ { print $2 }' "$CHART/Chart.yaml")"
[[ -n "$APP_VERSION" ]] || die "no appVersion in $CHART/Chart.yaml"
IMAGE="$REPOSITORY:$APP_VERSION"
log "building $IMAGE from $ROOT/Dockerfile"
if docker buildx version >/dev/null 2>&1; then
    # No provenance attestation: with Docker's containerd image store, `kind load docker-image`
    # cannot import an image that has one (kind issue 3795).
    docker buildx build --load --provenance=false -t "$IMAGE" "$ROOT"
else
    docker build -t "$IMAGE" "$ROOT"
fi
log "loading $IMAGE into cluster $NAME"
if ! kind load docker-image "$IMAGE" --name "$NAME"; then
    log "kind load docker-image failed; loading a single-platform image archive instead"
    arch="$(docker version --format '{{.Server.Arch}}')"
    docker image save --platform "linux/$arch" -o "$STATE/image.tar" "$IMAGE" ||
        docker image save -o "$STATE/image.tar" "$IMAGE"
    kind load image-archive "$STATE/image.tar" --name "$NAME"
    rm -f "$STATE/image.tar"
fi

# ---------------------------------------------------------------------------------------------
# 4. The node test, the same code CI runs on its own node
# ---------------------------------------------------------------------------------------------

# The kind node is a container: the test runs what it must do on the node (its iptables, a
# look at the agent's process and hostPath) with docker exec, everything else through the API
# server. It installs the chart as a user does and removes it when it passes.
NODE_CONTAINER="$NAME-control-plane"
docker inspect "$NODE_CONTAINER" >/dev/null 2>&1 ||
    die "no node container $NODE_CONTAINER: the node test needs kind's one-node cluster"
log "CLAW_NODE_KUBECONFIG=$KUBECONFIG_FILE CLAW_NODE_EXEC='docker exec $NODE_CONTAINER' cargo test --test k8s_node"
(
    cd "$ROOT"
    CLAW_NODE_KUBECONFIG="$KUBECONFIG_FILE" CLAW_NODE_EXEC="docker exec $NODE_CONTAINER" \
        cargo test --locked --test k8s_node -- --nocapture
)

if ((SKIP_TESTS)); then
    log "image, chart and node test: OK (--skip-tests: not running the rest of the suite)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 5. The rest of the cluster test suite, against this cluster
# ---------------------------------------------------------------------------------------------

# Tests that need the local control plane fail on an external cluster: left out by name. One
# stops and starts kube-apiserver; some read etcd's data directory or its port; the admission
# tests run the operator's webhook on 127.0.0.1, which a kind API server (in its container)
# cannot call; the node-key test applies the agent's cluster-wide RBAC and admission policy as
# deploy/rbac/ ships them, which the chart's release owns there. The node test ran in step 4,
# and it runs the chart's webhook in pods.
LOCAL_ONLY=(--skip api_server_outage_reads_continue_and_writes_are_unavailable
    --skip each_agent_publishes_its_own_key_and_can_write_no_other
    --skip node_invoke_plaintext_reaches_no_log_object_or_etcd
    --skip the_chart_runs_on_a_node
    --skip plaintext_written_every_way_is_sealed_before_it_is_stored
    --skip with_the_webhook_down_plaintext_is_refused_and_nothing_stored
    --skip a_manifest_from_claw_secrets_seal_applies_once_and_only_where_it_was_sealed_for
    --skip a_standby_replica_seals_at_admission
    --skip objects_of_the_previous_version_are_migrated_and_stored_versions_pruned)
monitors="$(bash "$ROOT/hack/control-plane.sh" bin-dir)/crds/monitoring.coreos.com_servicemonitors.yaml"
[[ -f "$monitors" ]] ||
    die "no $monitors: run \`hack/control-plane.sh install\` (it fetches the pinned Prometheus Operator module)"
kc apply --server-side -f "$monitors" >/dev/null
kc wait --for=condition=Established crd/servicemonitors.monitoring.coreos.com --timeout=60s >/dev/null
log "KUBECONFIG_E2E=$KUBECONFIG_FILE cargo test --test 'k8s_*' -- ${LOCAL_ONLY[*]}"
(
    cd "$ROOT"
    KUBECONFIG_E2E="$KUBECONFIG_FILE" cargo test --locked --test 'k8s_*' -- "${LOCAL_ONLY[@]}" \
        ${TEST_ARGS[@]+"${TEST_ARGS[@]}"}
)
log "image, chart, node test and cluster test suite: OK"
