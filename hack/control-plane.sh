#!/usr/bin/env bash
# A real Kubernetes control plane (etcd + kube-apiserver) for tests, built from the Go module
# proxy. No Docker, no release downloads. See docs/control-plane.md.
#
#   hack/control-plane.sh install [--node]     build kube-apiserver, kubectl, etcd, helm and a test
#                                              KMS v2 plugin (kms-plugin) once per
#                                              version into the cache, with the CRDs every test
#                                              control plane serves (crds/: the Prometheus
#                                              Operator's ServiceMonitor); print the bin dir on stdout.
#                                              --node also builds kubelet, kube-proxy,
#                                              kube-controller-manager and kube-scheduler
#                                              (hack/node.sh runs them)
#   hack/control-plane.sh up DIR [--parent-pid PID] [--timeout SECS]
#                                              start etcd + kube-apiserver on free loopback ports with
#                                              state in DIR, wait for /readyz, install BIN/crds/*,
#                                              write DIR/kubeconfig
#                                              (system:masters admin) and print
#                                              `export KUBECONFIG=DIR/kubeconfig` on stdout. With
#                                              --parent-pid, a watchdog tears everything down (and
#                                              removes DIR) as soon as that process is gone.
#   hack/control-plane.sh down DIR             stop what `up DIR` started and remove DIR
#   hack/control-plane.sh stop-apiserver DIR   stop only kube-apiserver (etcd and DIR stay), to test
#                                              clients through an API server outage
#   hack/control-plane.sh start-apiserver DIR [--timeout SECS]
#                                              start kube-apiserver again with the arguments `up`
#                                              used (same port, same etcd data) and wait for /readyz
#   hack/control-plane.sh gc [ROOT]            remove leftovers of dead test runs under ROOT
#                                              (default ${TMPDIR:-/tmp}; dirs claw-secrets-cp-*)
#   hack/control-plane.sh bin-dir              print the bin dir (does not build)
#   hack/control-plane.sh versions             print the pinned versions
#
# `up` also writes DIR/tokens.csv, the API server's --token-auth-file: two human test users
# with random bearer tokens, `alice` and `bob` (lines `TOKEN,USER,UID,"GROUPS"`; both in group
# claw-secrets-test:humans, neither granted anything). Tests grant them access with RBAC.
#
# Environment:
#   CLAW_K8S_BIN    bin dir to build into / run from
#                   (default ${XDG_CACHE_HOME:-$HOME/.cache}/claw-secrets/k8s/<k8s version>/bin)
#   CLAW_K8S_BUILD_JOBS   go build -p (default: number of cores)
#
# Progress and logs go to stderr; stdout carries only the documented result line.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WRAPPERS="$HACK_DIR/k8s-bin"
MARKER=".claw-control-plane"
# shellcheck source-path=SCRIPTDIR source=k8s-bin/versions.env
source "$WRAPPERS/versions.env"
# shellcheck source-path=SCRIPTDIR source=lib/processes.sh
source "$HACK_DIR/lib/processes.sh"

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

bin_dir() {
    if [[ -n "${CLAW_K8S_BIN:-}" ]]; then
        printf '%s\n' "$CLAW_K8S_BIN"
    else
        printf '%s\n' "${XDG_CACHE_HOME:-$HOME/.cache}/claw-secrets/k8s/$K8S_VERSION/bin"
    fi
}

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

# Stamp = what the binary was built from; a mismatch (new version, new go.sum, new flags)
# triggers a rebuild of that wrapper's binaries only.
stamp_of() { # wrapper ldflags
    {
        printf '%s\n' "$2"
        cat "$WRAPPERS/$1/go.mod" "$WRAPPERS/$1/go.sum"
        # A wrapper with code of its own (kms-plugin): its sources too.
        find "$WRAPPERS/$1" -maxdepth 1 -name '*.go' -print0 | sort -z | xargs -0r cat
    } | sha256sum | cut -d' ' -f1
}

# build_wrapper WRAPPER LDFLAGS NAME=PKG... : builds each package PKG (a `tool` of the wrapper
# module) into $BIN/NAME, unless all are present and built from the same inputs.
build_wrapper() {
    local wrapper="$1" ldflags="$2"
    shift 2
    local stamp stampfile="$BIN/.stamp-$wrapper" fresh=1 spec
    local -a names=() pkgs=()
    for spec in "$@"; do
        names+=("${spec%%=*}")
        pkgs+=("${spec#*=}")
        [[ -x "$BIN/${spec%%=*}" ]] || fresh=0
    done
    stamp="$(stamp_of "$wrapper" "$ldflags")"
    if [[ $fresh == 1 && -f "$stampfile" && "$(cat "$stampfile")" == "$stamp" ]]; then
        log "$wrapper: up to date (${names[*]})"
        return 0
    fi
    local tmp start out i
    tmp="$(mktemp -d "$BIN/.build-$wrapper.XXXXXX")"
    start=$SECONDS
    # One `go build` per wrapper so packages shared by its binaries compile once; with several
    # packages `-o DIR/` names each binary after its import path's last element.
    if ((${#pkgs[@]} == 1)); then out="$tmp/${names[0]}"; else out="$tmp/"; fi
    log "$wrapper: building ${pkgs[*]} (slow on a cold cache)"
    (
        cd "$WRAPPERS/$wrapper"
        go build -trimpath -p "${CLAW_K8S_BUILD_JOBS:-$(nproc)}" -ldflags "$ldflags" -o "$out" "${pkgs[@]}"
    ) || { rm -rf "$tmp"; die "$wrapper: go build failed (see above)"; }
    for i in "${!names[@]}"; do
        [[ -x "$tmp/${names[$i]}" ]] || { rm -rf "$tmp"; die "$wrapper: go build did not produce ${names[$i]}"; }
    done
    for i in "${!names[@]}"; do
        mv -f "$tmp/${names[$i]}" "$BIN/${names[$i]}"
    done
    rm -rf "$tmp"
    printf '%s\n' "$stamp" >"$stampfile"
    log "$wrapper: built ${names[*]} in $((SECONDS - start))s"
}

# install_crds: the third-party CRDs every test control plane serves, into $BIN/crds, taken from
# the Go module proxy (the module's hash checked against versions.env).
install_crds() {
    local module=github.com/prometheus-operator/prometheus-operator
    local want="$BIN/crds/monitoring.coreos.com_servicemonitors.yaml"
    local stampfile="$BIN/crds/.stamp" stamp="$PROMETHEUS_OPERATOR_VERSION $PROMETHEUS_OPERATOR_SUM"
    if [[ -f "$want" && -f "$stampfile" && "$(cat "$stampfile")" == "$stamp" ]]; then
        log "crds: up to date (ServiceMonitor from prometheus-operator $PROMETHEUS_OPERATOR_VERSION)"
        return 0
    fi
    local info dir sum
    info="$(cd "$BIN" && GOFLAGS= go mod download -json "$module@$PROMETHEUS_OPERATOR_VERSION")" ||
        die "crds: go mod download $module@$PROMETHEUS_OPERATOR_VERSION failed (see above)"
    dir="$(sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p' <<<"$info")"
    sum="$(sed -n 's/^[[:space:]]*"Sum": "\(.*\)",*$/\1/p' <<<"$info")"
    [[ "$sum" == "$PROMETHEUS_OPERATOR_SUM" ]] ||
        die "crds: $module@$PROMETHEUS_OPERATOR_VERSION has hash $sum, versions.env pins $PROMETHEUS_OPERATOR_SUM"
    mkdir -p "$BIN/crds"
    install -m 0644 "$dir/example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml" "$want"
    printf '%s\n' "$stamp" >"$stampfile"
    log "crds: ServiceMonitor from prometheus-operator $PROMETHEUS_OPERATOR_VERSION"
}

cmd_install() {
    local node=0
    case "${1:-}" in
    "") ;;
    --node) node=1 ;;
    *) die "usage: $0 install [--node]" ;;
    esac
    command -v go >/dev/null || die "go is not installed: Go (>= 1.24; etcd needs 1.26, which go fetches itself unless GOTOOLCHAIN=local) builds the control plane"
    BIN="$(bin_dir)"
    mkdir -p "$BIN"
    # Reproducible, static builds from the committed go.mod/go.sum, never touching the repo's
    # module files. (An older local Go switches itself to the version the wrappers need
    # through the module proxy, unless GOTOOLCHAIN=local.)
    export CGO_ENABLED=0 GOFLAGS="-mod=readonly -buildvcs=false" GOWORK=off
    local w m v
    for w in kubernetes:k8s.io/kubernetes:$K8S_VERSION node:k8s.io/kubernetes:$K8S_VERSION \
        etcd:go.etcd.io/etcd/server/v3:$ETCD_VERSION helm:helm.sh/helm/v3:$HELM_VERSION \
        "kms-plugin:k8s.io/kms:v0.${K8S_VERSION#v1.}"; do
        IFS=: read -r w m v <<<"$w"
        grep -qE "^[[:space:]]*(require[[:space:]]+)?$m $v( |\$)" "$WRAPPERS/$w/go.mod" ||
            die "hack/k8s-bin/$w/go.mod does not require $m $v (versions.env); run: bash hack/k8s-bin/update.sh"
    done
    local start=$SECONDS
    # One installer at a time per bin dir (parallel CI jobs, a test racing a developer).
    exec 9>"$BIN/.install.lock"
    flock 9

    local k8s_minor="${K8S_VERSION#v1.}"
    k8s_minor="${k8s_minor%%.*}"
    local kv="" p
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        kv+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$k8s_minor"
        kv+=" -X $p.gitTreeState=clean"
    done
    build_wrapper kubernetes "-s -w$kv" \
        kube-apiserver=k8s.io/kubernetes/cmd/kube-apiserver kubectl=k8s.io/kubernetes/cmd/kubectl
    if ((node)); then
        # The node's binaries (hack/node.sh): same version stamp, same Go build cache.
        build_wrapper node "-s -w$kv" kubelet=k8s.io/kubernetes/cmd/kubelet \
            kube-proxy=k8s.io/kubernetes/cmd/kube-proxy \
            kube-controller-manager=k8s.io/kubernetes/cmd/kube-controller-manager \
            kube-scheduler=k8s.io/kubernetes/cmd/kube-scheduler
    fi
    build_wrapper etcd "-s -w" etcd=go.etcd.io/etcd/server/v3

    # helm's Makefile stamps its own version and the Kubernetes minor it was built against.
    local hv="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    hv+=" -X helm.sh/helm/v3/internal/version.metadata="
    local cg cg_minor
    cg="$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$WRAPPERS/helm/go.mod")"
    cg_minor="${cg#v0.}"
    cg_minor="${cg_minor%%.*}"
    for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        hv+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$cg_minor"
    done
    build_wrapper helm "-s -w $hv" helm=helm.sh/helm/v3/cmd/helm
    # A KMS v2 plugin for the tests of --kms-plugin, on Kubernetes' own k8s.io/kms (small).
    build_wrapper kms-plugin "-s -w" kms-plugin=claw-secrets/hack/k8s-bin/kms-plugin
    install_crds

    log "kube-apiserver: $("$BIN/kube-apiserver" --version 2>&1)"
    log "kubectl: $("$BIN/kubectl" version --client 2>&1 | head -1)"
    log "etcd: $("$BIN/etcd" --version 2>&1 | head -1)"
    log "helm: $("$BIN/helm" version --short 2>&1)"
    log "install finished in $((SECONDS - start))s"
    printf '%s\n' "$BIN"
}

# ---------------------------------------------------------------------------------------------
# up / down
# ---------------------------------------------------------------------------------------------

# port_in_use PORT: is anything bound to PORT (tcp or tcp6, any state but a closed one)?
port_in_use() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# free_port: a random loopback port nobody uses (ports handed out earlier in this run excluded).
TAKEN_PORTS=" "
free_port() {
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        [[ "$TAKEN_PORTS" == *" $p "* ]] && continue
        port_in_use "$p" && continue
        TAKEN_PORTS+="$p "
        printf '%d\n' "$p"
        return 0
    done
    die "no free port found"
}

stop_servers() { kill_recorded "$1" kube-apiserver etcd; } # DIR

# stop_all DIR: first an `up` still starting things in DIR (so it cannot start anything after
# this), then the watchdog, then the servers.
stop_all() {
    kill_recorded "$1" up watchdog
    stop_servers "$1"
}

# Refuse to touch a directory that `up` did not create (or an empty / new one).
check_dir_is_ours() {
    local dir="$1"
    [[ -e "$dir" ]] || return 0
    [[ -d "$dir" ]] || die "$dir exists and is not a directory"
    [[ -f "$dir/$MARKER" ]] && return 0
    [[ -z "$(ls -A "$dir")" ]] && return 0
    die "$dir is not empty and was not created by '$0 up'; refusing to use it"
}

gen_certs() { # PKI_DIR
    local d="$1"
    mkdir -p "$d"
    (
        cd "$d"
        umask 077
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key 2>/dev/null
        openssl req -x509 -new -key ca.key -sha256 -days 3650 -subj "/CN=claw-secrets-test-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" \
            -out ca.crt 2>/dev/null

        cat >serving.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
        openssl ecparam -name prime256v1 -genkey -noout -out serving.key 2>/dev/null
        openssl req -new -key serving.key -subj "/CN=kube-apiserver" -out serving.csr 2>/dev/null
        openssl x509 -req -in serving.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -sha256 -extfile serving.ext -out serving.crt 2>/dev/null

        cat >client.ext <<'EOF'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
        openssl ecparam -name prime256v1 -genkey -noout -out admin.key 2>/dev/null
        openssl req -new -key admin.key -subj "/O=system:masters/CN=claw-secrets-test-admin" \
            -out admin.csr 2>/dev/null
        openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
            -sha256 -extfile client.ext -out admin.crt 2>/dev/null

        # Service-account token signing key (TokenRequest) and its public half (TokenReview).
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
        openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
        rm -f ./*.csr ./*.srl ./*.ext
    ) || die "certificate generation failed (is openssl installed?)"
}

# gen_tokens DIR: the static token file (--token-auth-file) with the human test users.
gen_tokens() {
    local dir="$1" user
    (
        umask 077
        for user in alice bob; do
            printf '%s,%s,%s,"claw-secrets-test:humans"\n' "$(openssl rand -hex 24)" "$user" "uid-$user"
        done >"$dir/tokens.csv.tmp"
        mv "$dir/tokens.csv.tmp" "$dir/tokens.csv"
    ) || die "token file generation failed"
}

# serve_crds DIR BIN: install the CRDs of BIN/crds into the control plane of DIR, and wait until
# they are served (the tests validate objects of those kinds with the API server).
serve_crds() {
    local dir="$1" bin="$2" crd
    [[ -f "$bin/crds/monitoring.coreos.com_servicemonitors.yaml" ]] ||
        die "$bin/crds has no ServiceMonitor CRD: run \`bash hack/control-plane.sh install\`"
    for crd in "$bin"/crds/*.yaml; do
        # Server-side: the CRD is larger than the client-side apply annotation allows.
        "$bin/kubectl" --kubeconfig "$dir/kubeconfig" apply --server-side -f "$crd" >/dev/null ||
            die "could not install $crd"
    done
    # Polled, not `kubectl wait`: that fails at once ("<nil> is of the type <nil>") while the new
    # CRD has no status conditions yet.
    local i established
    for ((i = 0; i < 600; i++)); do
        established="$("$bin/kubectl" --kubeconfig "$dir/kubeconfig" get crd servicemonitors.monitoring.coreos.com \
            -o 'jsonpath={.status.conditions[?(@.type=="Established")].status}' 2>/dev/null || true)"
        [[ "$established" == True ]] && return 0
        sleep 0.1
    done
    die "the ServiceMonitor CRD was not established within 60 s"
}

write_kubeconfig() { # DIR PORT
    local dir="$1" port="$2" pki="$1/pki"
    b64() { base64 -w0 <"$1"; }
    cat >"$dir/kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: claw-secrets-test
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(b64 "$pki/ca.crt")
users:
- name: claw-secrets-test-admin
  user:
    client-certificate-data: $(b64 "$pki/admin.crt")
    client-key-data: $(b64 "$pki/admin.key")
contexts:
- name: claw-secrets-test
  context:
    cluster: claw-secrets-test
    user: claw-secrets-test-admin
    namespace: default
current-context: claw-secrets-test
EOF
    chmod 600 "$dir/kubeconfig.tmp"
    mv "$dir/kubeconfig.tmp" "$dir/kubeconfig"
}

# start_bg DIR NAME CMD...: start CMD detached (own session, no inherited stdio, so whoever ran
# `up` -- e.g. a test harness capturing output -- is not kept waiting), logging to DIR/NAME.log.

cmd_up() {
    local dir="" parent="" timeout=120
    while (($#)); do
        case "$1" in
        --parent-pid) parent="${2:?--parent-pid needs a PID}"; shift 2 ;;
        --parent-pid=*) parent="${1#*=}"; shift ;;
        --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
        --timeout=*) timeout="${1#*=}"; shift ;;
        -*) die "unknown option $1" ;;
        *) [[ -z "$dir" ]] || die "only one DIR"; dir="$1"; shift ;;
        esac
    done
    [[ -n "$dir" ]] || die "usage: $0 up DIR [--parent-pid PID] [--timeout SECS]"
    local bin
    bin="$(bin_dir)"
    for b in etcd kube-apiserver; do
        [[ -x "$bin/$b" ]] || die "$bin/$b is missing: run 'bash hack/control-plane.sh install' first (about 10 minutes on a cold cache)"
    done
    command -v openssl >/dev/null || die "openssl is needed to generate the test certificates"
    command -v curl >/dev/null || die "curl is needed to probe /readyz"

    check_dir_is_ours "$dir"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    # Leftovers of a crashed run in the same DIR: stop them and start from a clean slate.
    if [[ -f "$dir/$MARKER" ]]; then
        log "cleaning up a previous control plane in $dir"
        stop_all "$dir"
        find "$dir" -mindepth 1 -delete
    fi
    : >"$dir/$MARKER"
    record "$dir" up "$$"

    if [[ -n "$parent" ]]; then
        local pstart
        pstart="$(proc_start_time "$parent")" || die "--parent-pid $parent: no such process"
        printf '%s %s\n' "$parent" "$pstart" >"$dir/parent.pid"
        # Watchdog: when the parent (e.g. a test binary) is gone -- exited, panicked, killed
        # with SIGKILL -- stop the servers and remove DIR. Started before the servers so that
        # a parent dying during start-up is covered too.
        # shellcheck disable=SC2016 # the watchdog script expands its own arguments
        start_bg "$dir" watchdog bash -c '
            parent="$1"; pstart="$2"; script="$3"; dir="$4"
            st() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; s="${s##*) }"; local -a f; read -r -a f <<<"$s"; printf "%s\n" "${f[19]}"; }
            while [[ "$(st "$parent")" == "$pstart" ]]; do sleep 0.5; done
            rm -f "$dir/watchdog.pid"
            exec bash "$script" down "$dir"
        ' watchdog "$parent" "$pstart" "$HACK_DIR/control-plane.sh" "$dir"
    fi

    local start=$SECONDS attempt
    gen_certs "$dir/pki"
    gen_tokens "$dir"
    for attempt in 1 2 3; do
        if start_servers "$dir" "$bin" "$timeout"; then
            break
        fi
        ((attempt < 3)) || die "control plane did not come up (logs: $dir/etcd.log, $dir/kube-apiserver.log)"
        log "retrying with other ports"
    done
    write_kubeconfig "$dir" "$APISERVER_PORT"
    serve_crds "$dir" "$bin"

    rm -f "$dir/up.pid"
    log "control plane up in $((SECONDS - start))s: https://127.0.0.1:$APISERVER_PORT (state in $dir)"
    printf 'export KUBECONFIG=%s/kubeconfig\n' "$dir"
}

# start_servers DIR BIN TIMEOUT: start etcd and kube-apiserver on fresh free ports and wait for
# /readyz. Sets APISERVER_PORT. Returns non-zero (with everything stopped) on failure.
start_servers() {
    local dir="$1" bin="$2" timeout="$3" pki="$1/pki"
    local etcd_port peer_port api_port
    etcd_port="$(free_port)"
    peer_port="$(free_port)"
    api_port="$(free_port)"
    rm -rf "$dir/etcd-data"
    start_bg "$dir" etcd "$bin/etcd" \
        --name=claw-test \
        --data-dir="$dir/etcd-data" \
        --listen-client-urls="http://127.0.0.1:$etcd_port" \
        --advertise-client-urls="http://127.0.0.1:$etcd_port" \
        --listen-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
        --initial-cluster="claw-test=http://127.0.0.1:$peer_port" \
        --unsafe-no-fsync=true \
        --log-level=warn

    # Like envtest: kube-apiserver only once etcd answers, so its storage comes up first time.
    local deadline=$((SECONDS + timeout))
    until curl -sf --max-time 2 "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; do
        if ! alive "$dir" etcd || ((SECONDS >= deadline)); then
            log "etcd did not become healthy; last log lines:"
            tail -n 15 "$dir/etcd.log" >&2 || true
            stop_servers "$dir"
            return 1
        fi
        sleep 0.1
    done

    # The arguments are saved so that `start-apiserver` can bring the same server back.
    local -a api_args=(
        "$bin/kube-apiserver"
        --etcd-servers="http://127.0.0.1:$etcd_port"
        --bind-address=127.0.0.1
        --advertise-address=127.0.0.1
        --secure-port="$api_port"
        --tls-cert-file="$pki/serving.crt"
        --tls-private-key-file="$pki/serving.key"
        --client-ca-file="$pki/ca.crt"
        --token-auth-file="$dir/tokens.csv"
        --authorization-mode=RBAC
        --service-account-issuer=https://kubernetes.default.svc.cluster.local
        --service-account-key-file="$pki/sa.pub"
        --service-account-signing-key-file="$pki/sa.key"
        --service-cluster-ip-range=10.0.0.0/24
        # No kube-proxy here, so nothing routes a Service's ClusterIP: the API server must call
        # webhook (and aggregated API) Services at their endpoints, the pods' addresses.
        --enable-aggregator-routing=true
        --allow-privileged=true
        --disable-admission-plugins=ServiceAccount
        --profiling=false
        --v=1
    )
    printf '%s\0' "${api_args[@]}" >"$dir/kube-apiserver.args"
    printf '%s\n' "$api_port" >"$dir/kube-apiserver.port"
    start_bg "$dir" kube-apiserver "${api_args[@]}"

    if wait_apiserver_ready "$dir" "$api_port" "$deadline"; then
        APISERVER_PORT="$api_port"
        return 0
    fi
    stop_servers "$dir"
    return 1
}

# wait_apiserver_ready DIR PORT DEADLINE: wait (until $SECONDS reaches DEADLINE) for /readyz of
# the kube-apiserver recorded in DIR; non-zero, with the last log lines, if it exits or times out.
wait_apiserver_ready() {
    local dir="$1" port="$2" deadline="$3" pki="$1/pki" code
    while ((SECONDS < deadline)); do
        if ! alive "$dir" etcd || ! alive "$dir" kube-apiserver; then
            log "a server exited early; last log lines:"
            tail -n 15 "$dir/etcd.log" "$dir/kube-apiserver.log" >&2 || true
            return 1
        fi
        code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 \
            --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
            "https://127.0.0.1:$port/readyz" 2>/dev/null || true)"
        [[ "$code" == 200 ]] && return 0
        sleep 0.25
    done
    log "kube-apiserver not ready after waiting; last log lines:"
    tail -n 15 "$dir/kube-apiserver.log" >&2 || true
    return 1
}

# check_up DIR: DIR holds a control plane that `up` finished starting.
check_up() {
    local dir="$1"
    [[ -n "$dir" ]] || die "usage: $0 stop-apiserver|start-apiserver DIR"
    [[ -f "$dir/$MARKER" ]] || die "$dir was not created by '$0 up'"
    [[ -f "$dir/kube-apiserver.args" && -f "$dir/kube-apiserver.port" ]] ||
        die "$dir has no saved kube-apiserver arguments (started by an older '$0 up'?)"
    alive "$dir" etcd || die "etcd of $dir is not running"
}

# stop-apiserver DIR: stop kube-apiserver only; etcd, its data and DIR stay.
cmd_stop_apiserver() {
    local dir="${1:-}"
    check_up "$dir"
    # It stops listening at once, but open watches keep a stopping kube-apiserver alive long
    # after that: do not wait the full grace period for them.
    KILL_GRACE=3 kill_recorded "$dir" kube-apiserver
    alive "$dir" kube-apiserver && die "kube-apiserver of $dir did not stop"
    log "kube-apiserver of $dir stopped (etcd still running)"
}

# start-apiserver DIR [--timeout SECS]: start kube-apiserver with the saved arguments (same
# port, same etcd) and wait for /readyz.
cmd_start_apiserver() {
    local dir="" timeout=120
    while (($#)); do
        case "$1" in
        --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
        --timeout=*) timeout="${1#*=}"; shift ;;
        -*) die "unknown option $1" ;;
        *) [[ -z "$dir" ]] || die "only one DIR"; dir="$1"; shift ;;
        esac
    done
    check_up "$dir"
    local port
    port="$(cat "$dir/kube-apiserver.port")"
    if alive "$dir" kube-apiserver; then
        log "kube-apiserver of $dir is already running"
        return 0
    fi
    local -a api_args=()
    mapfile -d '' api_args <"$dir/kube-apiserver.args"
    start_bg "$dir" kube-apiserver "${api_args[@]}"
    wait_apiserver_ready "$dir" "$port" "$((SECONDS + timeout))" ||
        die "kube-apiserver of $dir did not come back on port $port (log: $dir/kube-apiserver.log)"
    log "kube-apiserver of $dir running again: https://127.0.0.1:$port"
}

cmd_down() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || die "usage: $0 down DIR"
    [[ -e "$dir" ]] || { log "$dir does not exist; nothing to do"; return 0; }
    [[ -f "$dir/$MARKER" ]] || die "$dir was not created by '$0 up'; refusing to remove it"
    stop_all "$dir"
    rm -rf "$dir"
    log "control plane in $dir stopped and removed"
}

# gc [ROOT]: remove control planes under ROOT (default $TMPDIR or /tmp) named claw-secrets-cp-*
# whose --parent-pid process is gone but which are still there (their watchdog was killed too).
cmd_gc() {
    local root="${1:-${TMPDIR:-/tmp}}" d
    for d in "$root"/claw-secrets-cp-*; do
        [[ -f "$d/$MARKER" && -f "$d/parent.pid" ]] || continue
        alive "$d" parent && continue
        log "removing stale control plane $d"
        cmd_down "$d" || true
    done
}

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
    install) cmd_install "$@" ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    stop-apiserver) cmd_stop_apiserver "$@" ;;
    start-apiserver) cmd_start_apiserver "$@" ;;
    gc) cmd_gc "$@" ;;
    bin-dir) bin_dir ;;
    versions) printf 'kubernetes %s\netcd %s\nhelm %s\n' "$K8S_VERSION" "$ETCD_VERSION" "$HELM_VERSION" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 2
        ;;
    esac
}

{
    main "$@"
    exit $?
}
