#!/usr/bin/env bash
# A one-node Kubernetes cluster that runs pods, for the tests that install the chart for real:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kube-proxy (built
# from Go modules by hack/control-plane.sh install --node), containerd, runc and the CNI
# plugins (Debian packages). No Docker, no registry: images are OCI tars imported into
# containerd. See docs/control-plane.md, "A node that runs pods".
#
#   hack/node.sh install               the Debian packages (apt-get), the binaries, and the
#                                      pause image; prints the bin dir. Needs root.
#   hack/node.sh up DIR [--parent-pid PID] [--timeout SECS]
#                                      start the cluster with all its state in DIR, wait until
#                                      the node is Ready, print `export KUBECONFIG=DIR/admin.kubeconfig`.
#                                      With --parent-pid, a watchdog runs `down DIR` as soon as
#                                      that process is gone.
#   hack/node.sh down DIR              delete the pods (kubelet and CNI undo their sandboxes),
#                                      stop everything `up` started, undo every host change,
#                                      remove DIR
#   hack/node.sh import DIR TAR...     import OCI image tars into the node's containerd
#   hack/node.sh node-ip               the node's address (the API server listens there)
#   hack/node.sh pod-cidr              the range of the pods' addresses
#   hack/node.sh exec CMD...           run CMD in the node's network namespace (its iptables, say)
#   hack/node.sh measure DIR [SECONDS] CPU and RSS of every process of the node, idle or not
#
# Network containment: every component runs in a network namespace this script creates
# (`clawnode`), where the node's address and every pod address are on a bridge (10.213.0.0/16,
# the node at 10.213.0.1). A veth pair (10.212.0.1 here, 10.212.0.2 there) and one route let
# this host reach the node and its pods; the namespace has no other route, so nothing in it can
# send anywhere but the node, its pods and this host, and pods get no DNS server. The node's
# iptables rules (kube-proxy, hostPorts) and net sysctls stay in the namespace: the host's are
# never touched. One node per machine at a time (the names and addresses are fixed). `down`
# deletes the namespace and the veth, and restores the mounts, cgroups, host sysctls and host
# directories the node changed.
#
# Progress goes to stderr (each component's log and pid to DIR/proc/); stdout carries only the
# documented result line.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib/processes.sh
source "$HACK_DIR/lib/processes.sh"
MARKER=".claw-node"

log() { printf '[node] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

NODE_NAME=claw-node
BRIDGE=clawnode0
NODE_IP=10.213.0.1
POD_CIDR=10.213.0.0/16
POD_RANGE_START=10.213.1.1
SVC_CIDR=10.214.0.0/16
API_PORT=6443
ETCD_PORT=12379
ETCD_PEER_PORT=12380
CNI_BIN=/usr/lib/cni
NETNS=clawnode
VETH_HOST=clawnode-h
VETH_NODE=clawnode-n
LINK_HOST_IP=10.212.0.1
LINK_NODE_IP=10.212.0.2
PAUSE_IMAGE=localhost/claw-node/pause:3.10
APT_PACKAGES=(containerd runc containernetworking-plugins iptables busybox-static curl gcc libc6-dev)

bin_dir() { bash "$HACK_DIR/control-plane.sh" bin-dir; }

# in_node CMD...: run CMD in the node's network namespace (only that: the mounts stay the
# host's, so the kubelet's volume mounts are where containerd sees them).
IN_NODE=(nsenter "--net=/run/netns/$NETNS")
in_node() { "${IN_NODE[@]}" "$@"; }

# ---------------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------------

cmd_install() {
    [[ $EUID == 0 ]] || die "install needs root (apt-get)"
    local missing=() p
    for p in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        log "apt-get install ${missing[*]}"
        apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2 ||
            die "apt-get install ${missing[*]} failed"
    fi
    local bin
    bin="$(bash "$HACK_DIR/control-plane.sh" install --node)"
    pause_image "$bin"
    example_image "$bin"
    printf '%s\n' "$bin"
}

# pause_image BIN: the sandbox ("pause") image, compiled from kubernetes' own pause.c (from the
# module cache) and kept as an OCI tar in BIN/images.
pause_image() {
    local bin="$1" out="$1/images/pause.tar"
    [[ -s "$out" ]] && { log "pause image: up to date"; return 0; }
    local dir root
    dir="$(cd "$HACK_DIR/k8s-bin/node" && GOFLAGS=-mod=readonly go list -m -f '{{.Dir}}' k8s.io/kubernetes)" ||
        die "cannot find k8s.io/kubernetes in the module cache"
    [[ -f "$dir/build/pause/linux/pause.c" ]] || die "$dir/build/pause/linux/pause.c missing"
    root="$(mktemp -d)"
    gcc -Os -static -DVERSION=v3.10-claw -o "$root/pause" "$dir/build/pause/linux/pause.c"
    strip "$root/pause"
    mkdir -p "$bin/images"
    python3 "$HACK_DIR/oci-image.py" "$out.tmp" "$PAUSE_IMAGE" "$root" '{"Entrypoint":["/pause"]}' >&2
    mv "$out.tmp" "$out"
    rm -rf "$root"
    log "pause image: built"
}

# example_image BIN: what examples/40-workload.yaml runs (curlimages/curl:8.11.1: sh, curl,
# sed, cat, sleep), made from Debian's busybox and curl, since this node has no registry. It
# carries the name the examples use, so they apply unchanged; it is a stand-in only in that.
EXAMPLE_IMAGE=docker.io/curlimages/curl:8.11.1
example_image() {
    local bin="$1" out="$1/images/curl.tar"
    [[ -s "$out" ]] && { log "examples' image: up to date"; return 0; }
    local root lib a
    root="$(mktemp -d)"
    mkdir -p "$root"/{bin,usr/bin,tmp,etc/ssl/certs,home/curl_user}
    install -m 0755 /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do
        [[ $a == busybox ]] || ln -sf busybox "$root/bin/$a"
    done
    install -m 0755 "$(command -v curl)" "$root/usr/bin/curl"
    for lib in $(ldd "$(command -v curl)" | awk '/=>/ { print $3 } /ld-linux/ && !/=>/ { print $1 }'); do
        install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
    done
    install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
    printf 'root:x:0:0:root:/root:/bin/sh\ncurl_user:x:100:101:curl:/home/curl_user:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\ncurl_group:x:101:\n' >"$root/etc/group"
    chmod 1777 "$root/tmp"
    mkdir -p "$bin/images"
    python3 "$HACK_DIR/oci-image.py" "$out.tmp" "$EXAMPLE_IMAGE" "$root" \
        '{"User":"100","Entrypoint":["/usr/bin/curl"],"Cmd":["--help"],"WorkingDir":"/home/curl_user","Env":["PATH=/usr/bin:/bin"]}' >&2
    mv "$out.tmp" "$out"
    rm -rf "$root"
    log "examples' image: built"
}

# ---------------------------------------------------------------------------------------------
# up
# ---------------------------------------------------------------------------------------------

wait_for() { # DIR WHAT SECONDS PROC CMD...: poll CMD; fail if PROC died or time ran out
    local dir="$1" what="$2" secs="$3" proc="$4" i
    shift 4
    for ((i = 0; i < secs * 4; i++)); do
        "$@" >/dev/null 2>&1 && return 0
        if [[ -n "$proc" ]] && ! alive "$dir/proc" "$proc"; then
            tail -20 "$dir/proc/$proc.log" >&2
            die "$proc exited (log: $dir/proc/$proc.log)"
        fi
        sleep 0.25
    done
    [[ -n "$proc" ]] && tail -20 "$dir/proc/$proc.log" >&2
    die "timed out waiting for $what"
}

gen_pki() { # DIR
    local p="$1/pki"
    mkdir -p "$p"
    (
        cd "$p"
        umask 077
        openssl ecparam -name prime256v1 -genkey -noout -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 30 -subj "/CN=claw-node-ca" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" -out ca.crt
        cert() { # NAME SUBJECT EKU [SAN]
            openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"
            openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
            {
                echo "basicConstraints=critical,CA:FALSE"
                echo "keyUsage=critical,digitalSignature,keyEncipherment"
                echo "extendedKeyUsage=$3"
                [[ -n "${4:-}" ]] && echo "subjectAltName=$4"
            } >"$1.ext"
            openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 \
                -sha256 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
            rm -f "$1.csr" "$1.ext"
        }
        cert apiserver "/CN=kube-apiserver" serverAuth \
            "IP:$NODE_IP,IP:${SVC_CIDR%.0/16}.1,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
        cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
        cert admin "/O=system:masters/CN=claw-node-admin" clientAuth
        cert controller-manager "/CN=system:kube-controller-manager" clientAuth
        cert scheduler "/CN=system:kube-scheduler" clientAuth
        cert kube-proxy "/CN=system:kube-proxy" clientAuth
        cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" clientAuth
        cert kubelet-serving "/CN=$NODE_NAME" serverAuth "IP:$NODE_IP,IP:127.0.0.1,DNS:$NODE_NAME"
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
        openssl pkey -in sa.key -pubout -out sa.pub
        rm -f ca.srl
    ) 2>"$1/proc/pki.log" || die "openssl failed (see $1/proc/pki.log)"
    local n
    for n in admin controller-manager scheduler kube-proxy kubelet; do
        cat >"$1/$n.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: claw-node
  cluster: {server: "https://$NODE_IP:$API_PORT", certificate-authority: "$p/ca.crt"}
users:
- name: $n
  user: {client-certificate: "$p/$n.crt", client-key: "$p/$n.key"}
contexts:
- name: claw-node
  context: {cluster: claw-node, user: $n, namespace: default}
current-context: claw-node
EOF
    done
}

write_configs() { # DIR
    local d="$1" sock="$1/containerd/containerd.sock"
    cat >"$d/containerd/config.toml" <<EOF
# containerd 1.6 (Debian bookworm): the CRI plugin for the kubelet, cgroupfs, no registry.
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
[grpc]
  address = "$sock"
[ttrpc]
  address = "$sock.ttrpc"
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  disable_apparmor = true
  # No CAP_SYS_RESOURCE on these machines: without this, setting the sandbox's
  # oom_score_adj fails in runc and every pod fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "$(command -v runc)"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$CNI_BIN"
    conf_dir = "$d/cni/net.d"
    max_conf_num = 1
EOF
    cat >"$d/cni/net.d/10-claw-node.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "claw-node",
  "plugins": [
    {
      "type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
      "ipam": {
        "type": "host-local", "dataDir": "$d/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "$POD_RANGE_START", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
  ]
}
EOF
    cat >"$d/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$sock
cgroupDriver: cgroupfs          # no systemd on these machines
failSwapOn: false
oomScoreAdj: 0                  # the kubelet cannot lower its own without CAP_SYS_RESOURCE
failCgroupV1: false             # these machines are cgroup v1
address: $NODE_IP
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
tlsCertFile: $d/pki/kubelet-serving.crt
tlsPrivateKeyFile: $d/pki/kubelet-serving.key
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $d/pki/ca.crt}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: ""                  # pods get no upstream nameserver: no traffic off the machine
staticPodPath: ""
podLogsDir: $d/pod-logs
serializeImagePulls: false
# Absolute and small: the node shares the machine's disk, which the builds of a CI run fill; 2% of
# a large disk is gigabytes, and under DiskPressure the kubelet refuses every new pod (the
# DaemonSet controller then re-creates the agent's pod in a loop, with a growing backoff).
evictionHard: {memory.available: "100Mi", nodefs.available: "512Mi", imagefs.available: "512Mi"}
imageGCHighThresholdPercent: 99
imageGCLowThresholdPercent: 98
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 10s
EOF
    cat >"$d/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: $d/kube-proxy.kubeconfig}
hostnameOverride: $NODE_NAME
clusterCIDR: $POD_CIDR
bindAddress: 127.0.0.1
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
nodePortAddresses: ["$NODE_IP/32"]
iptables: {localhostNodePorts: false, masqueradeAll: false}
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# The host state `up` changes, remembered for `down`.
remember_host() { # DIR
    local d="$1" k
    # Sysctls the kubelet sets on the host (its net.* ones stay in the node's namespace).
    for k in kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom; do
        printf '%s=%s\n' "$k" "$(sysctl -n "$k" 2>/dev/null || true)"
    done >"$d/sysctl.orig"
    # Host paths the kubelet and containerd create outside DIR whatever they are told.
    for k in /var/lib/kubelet /var/lib/cni /run/containerd /var/log/containers /var/log/pods; do
        [[ -e $k ]] && echo "$k"
    done >"$d/preexisting"
    true
}

cmd_up() {
    local dir="" parent="" timeout=180
    while (($#)); do
        case "$1" in
        --parent-pid) parent="${2:?--parent-pid needs a PID}"; shift 2 ;;
        --timeout) timeout="${2:?--timeout needs seconds}"; shift 2 ;;
        -*) die "unknown option $1" ;;
        *) [[ -z "$dir" ]] || die "only one DIR"; dir="$1"; shift ;;
        esac
    done
    [[ -n "$dir" ]] || die "usage: $0 up DIR [--parent-pid PID] [--timeout SECS]"
    [[ $EUID == 0 ]] || die "up needs root (containerd, kubelet, the bridge, iptables)"
    local bin b
    bin="$(bin_dir)"
    for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
        [[ -x "$bin/$b" ]] || die "$bin/$b missing: run \`bash hack/node.sh install\`"
    done
    [[ -s "$bin/images/pause.tar" ]] || die "no pause image: run \`bash hack/node.sh install\`"
    for b in containerd ctr containerd-shim-runc-v2 runc iptables; do
        command -v "$b" >/dev/null || die "$b missing: run \`bash hack/node.sh install\`"
    done
    for b in bridge host-local portmap loopback; do
        [[ -x "$CNI_BIN/$b" ]] || die "$CNI_BIN/$b missing: run \`bash hack/node.sh install\`"
    done
    [[ -e "/run/netns/$NETNS" ]] &&
        die "network namespace $NETNS exists: another node runs here (or a dead one: hack/node.sh down ITS_DIR)"
    [[ -e "$dir" ]] && die "$dir exists; pick a new directory"
    mkdir -p "$dir"/{proc,containerd,cni/net.d,cni/ipam,kubelet,pod-logs}
    dir="$(cd "$dir" && pwd)"
    touch "$dir/$MARKER"
    record "$dir/proc" up "$$"
    if [[ -n "$parent" ]]; then
        local pstart
        pstart="$(proc_start_time "$parent")" || die "--parent-pid $parent: no such process"
        # shellcheck disable=SC2016 # the watchdog expands its own arguments
        start_bg "$dir/proc" watchdog bash -c '
            st() { local s; s="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1; s="${s##*) }"; local -a f; read -r -a f <<<"$s"; printf "%s\n" "${f[19]}"; }
            while [[ "$(st "$1")" == "$2" ]]; do sleep 0.5; done
            rm -f "$4/proc/watchdog.pid"
            exec bash "$3" down "$4"
        ' watchdog "$parent" "$pstart" "$HACK_DIR/node.sh" "$dir"
    fi
    local start=$SECONDS
    remember_host "$dir"
    # The node lives in a network namespace of its own: its address is the gateway of the pod
    # bridge there (the kubelet refuses a loopback node IP), and a veth pair joins it to this
    # host, which routes the node's subnet to it. The namespace has no other route: nothing in
    # it can send anywhere but the node, its pods and this host.
    ip netns add "$NETNS"
    ip link add "$VETH_HOST" type veth peer name "$VETH_NODE"
    ip link set "$VETH_NODE" netns "$NETNS"
    ip addr add "$LINK_HOST_IP/30" dev "$VETH_HOST"
    ip link set "$VETH_HOST" up
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" addr add "$LINK_NODE_IP/30" dev "$VETH_NODE"
    ip -n "$NETNS" link set "$VETH_NODE" up
    ip -n "$NETNS" link add "$BRIDGE" type bridge
    ip -n "$NETNS" addr add "$NODE_IP/16" dev "$BRIDGE"
    ip -n "$NETNS" link set "$BRIDGE" up
    ip route add "$POD_CIDR" via "$LINK_NODE_IP" dev "$VETH_HOST"
    modprobe br_netfilter 2>/dev/null || true
    in_node sysctl -qw net.ipv4.ip_forward=1
    in_node sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true
    gen_pki "$dir"
    write_configs "$dir"
    local p="$dir/pki" sock="$dir/containerd/containerd.sock"
    export KUBECONFIG="$dir/admin.kubeconfig"

    start_bg "$dir/proc" etcd "${IN_NODE[@]}" "$bin/etcd" --name=claw-node --data-dir="$dir/etcd" \
        --listen-client-urls="http://127.0.0.1:$ETCD_PORT" --advertise-client-urls="http://127.0.0.1:$ETCD_PORT" \
        --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
        --initial-cluster="claw-node=http://127.0.0.1:$ETCD_PEER_PORT" \
        --unsafe-no-fsync=true --log-level=warn
    start_bg "$dir/proc" containerd "${IN_NODE[@]}" containerd --config "$dir/containerd/config.toml"
    wait_for "$dir" etcd 60 etcd in_node curl -sf "http://127.0.0.1:$ETCD_PORT/health"
    start_bg "$dir/proc" kube-apiserver "${IN_NODE[@]}" "$bin/kube-apiserver" \
        --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
        --bind-address="$NODE_IP" --advertise-address="$NODE_IP" --secure-port="$API_PORT" \
        --tls-cert-file="$p/apiserver.crt" --tls-private-key-file="$p/apiserver.key" \
        --client-ca-file="$p/ca.crt" --authorization-mode=Node,RBAC \
        --service-account-issuer=https://kubernetes.default.svc.cluster.local \
        --service-account-key-file="$p/sa.pub" --service-account-signing-key-file="$p/sa.key" \
        --api-audiences=https://kubernetes.default.svc.cluster.local \
        --service-cluster-ip-range="$SVC_CIDR" \
        --kubelet-client-certificate="$p/apiserver-kubelet-client.crt" \
        --kubelet-client-key="$p/apiserver-kubelet-client.key" \
        --kubelet-certificate-authority="$p/ca.crt" --kubelet-preferred-address-types=InternalIP \
        --allow-privileged=true --profiling=false --v=1 \
        --enable-aggregator-routing=true
    # --enable-aggregator-routing: the API server calls webhook Services (the operator's
    # admission webhook) at their endpoints, the pod IPs on the node's bridge. The node's
    # namespace has no default route, so a ClusterIP is "network unreachable" before kube-proxy's
    # rules could translate it; a real node's API server has one.
    wait_for "$dir" containerd 60 containerd ctr --address "$sock" version
    ctr --address "$sock" -n k8s.io images import "$bin/images/pause.tar" >/dev/null
    ctr --address "$sock" -n k8s.io images label "$PAUSE_IMAGE" io.cri-containerd.pinned=pinned >/dev/null
    ctr --address "$sock" -n k8s.io images import "$bin/images/curl.tar" >/dev/null
    apiready() { curl -sf --cacert "$p/ca.crt" --cert "$p/admin.crt" --key "$p/admin.key" "https://$NODE_IP:$API_PORT/readyz"; }
    wait_for "$dir" "kube-apiserver /readyz" "$timeout" kube-apiserver apiready
    start_bg "$dir/proc" kube-controller-manager "${IN_NODE[@]}" "$bin/kube-controller-manager" \
        --kubeconfig="$dir/controller-manager.kubeconfig" \
        --authentication-kubeconfig="$dir/controller-manager.kubeconfig" \
        --authorization-kubeconfig="$dir/controller-manager.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10257 --leader-elect=false \
        --use-service-account-credentials=true --service-account-private-key-file="$p/sa.key" \
        --root-ca-file="$p/ca.crt" --cluster-signing-cert-file="$p/ca.crt" \
        --cluster-signing-key-file="$p/ca.key" --service-cluster-ip-range="$SVC_CIDR" \
        --allocate-node-cidrs=false --profiling=false --v=1
    start_bg "$dir/proc" kube-scheduler "${IN_NODE[@]}" "$bin/kube-scheduler" \
        --kubeconfig="$dir/scheduler.kubeconfig" \
        --authentication-kubeconfig="$dir/scheduler.kubeconfig" \
        --authorization-kubeconfig="$dir/scheduler.kubeconfig" \
        --bind-address=127.0.0.1 --secure-port=10259 --leader-elect=false --profiling=false --v=1
    start_bg "$dir/proc" kubelet "${IN_NODE[@]}" "$bin/kubelet" --config="$dir/kubelet/config.yaml" \
        --kubeconfig="$dir/kubelet.kubeconfig" --root-dir="$dir/kubelet/root" \
        --cert-dir="$dir/kubelet/pki" --hostname-override="$NODE_NAME" --node-ip="$NODE_IP" --v=1
    start_bg "$dir/proc" kube-proxy "${IN_NODE[@]}" "$bin/kube-proxy" --config="$dir/kube-proxy.yaml" --v=1
    nodeready() {
        [[ "$("$bin/kubectl" get node "$NODE_NAME" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" == True ]]
    }
    wait_for "$dir" "node Ready" "$timeout" kubelet nodeready
    wait_for "$dir" "the default ServiceAccount" 60 kube-controller-manager \
        "$bin/kubectl" -n default get serviceaccount default
    rm -f "$dir/proc/up.pid"
    log "node $NODE_NAME Ready in $((SECONDS - start))s: https://$NODE_IP:$API_PORT (state in $dir)"
    printf 'export KUBECONFIG=%s/admin.kubeconfig\n' "$dir"
}

# ---------------------------------------------------------------------------------------------
# down
# ---------------------------------------------------------------------------------------------

cmd_down() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || die "usage: $0 down DIR"
    [[ -e "$dir" ]] || { log "$dir does not exist; nothing to do"; return 0; }
    [[ -f "$dir/$MARKER" ]] || die "$dir was not created by '$0 up'; refusing to touch it"
    dir="$(cd "$dir" && pwd)"
    local bin sock="$dir/containerd/containerd.sock" i
    bin="$(bin_dir)"
    export KUBECONFIG="$dir/admin.kubeconfig"
    set +e
    kill_recorded "$dir/proc" up watchdog
    # 1. Pods torn down by the kubelet (CNI DEL: veths, IPAM, hostPort rules; volume mounts).
    if alive "$dir/proc" kubelet && alive "$dir/proc" kube-apiserver; then
        kill_recorded "$dir/proc" kube-controller-manager kube-scheduler
        "$bin/kubectl" delete pods --all -A --grace-period=1 --wait=true --timeout=60s >/dev/null 2>&1
        for ((i = 0; i < 120; i++)); do
            [[ -z "$(ls -A "$dir/kubelet/root/pods" 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
    kill_recorded "$dir/proc" kubelet kube-proxy
    # 2. Containers left over (the kubelet was gone or timed out), then the servers.
    if alive "$dir/proc" containerd; then
        for i in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr --address "$sock" -n k8s.io tasks kill -s SIGKILL "$i" >/dev/null 2>&1
        done
        sleep 1
        for i in $(ctr --address "$sock" -n k8s.io tasks ls -q 2>/dev/null); do
            ctr --address "$sock" -n k8s.io tasks delete -f "$i" >/dev/null 2>&1
        done
    fi
    kill_recorded "$dir/proc" containerd kube-controller-manager kube-scheduler kube-apiserver etcd
    # 3. What is left: shims of this containerd, mounts under DIR, the node's network namespace,
    # the kubelet's cgroups, the host sysctls it set, host directories.
    local p
    for p in /proc/[0-9]*; do
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "-address $sock "; then
            kill -KILL "${p#/proc/}" 2>/dev/null
        fi
    done
    sleep 0.5
    awk -v r="$dir/" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
        while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
    # The node's network namespace holds the bridge, the pods' veths, every iptables rule the
    # kubelet, kube-proxy and the CNI plugins wrote, and the node's sysctls: deleting it (its
    # processes are gone) deletes all of them; the host keeps only the veth end and the route,
    # which go with it.
    if [[ -e "/run/netns/$NETNS" ]]; then
        ip netns delete "$NETNS" 2>/dev/null
    fi
    ip link del "$VETH_HOST" 2>/dev/null
    for p in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
        [[ -d "$p/kubepods" ]] && find "$p/kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    if [[ -f "$dir/sysctl.orig" ]]; then
        local k v
        while IFS='=' read -r k v; do
            [[ -n "$v" ]] && sysctl -qw "$k=$v" 2>/dev/null
        done <"$dir/sysctl.orig"
    fi
    find /var/log/containers -maxdepth 1 -lname "$dir/*" -delete 2>/dev/null
    if [[ -f "$dir/preexisting" ]]; then
        for p in /var/lib/kubelet /var/lib/cni /run/containerd /var/log/containers /var/log/pods; do
            [[ -e $p ]] || continue
            grep -qx "$p" "$dir/preexisting" && continue
            awk -v r="$p" 'index($5, r) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo && continue
            rm -rf --one-file-system "$p"
        done
    fi
    set -e
    if awk -v r="$dir/" 'index($5, r) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        die "mounts are still under $dir; not removing it"
    fi
    rm -rf --one-file-system "$dir"
    log "node in $dir stopped and removed"
}

# measure DIR [SECONDS]: CPU (% of one core, averaged over SECONDS, default 30) and RSS of every
# process of the node: the components `up` started, containerd's shims, and the containers'
# processes (named by their command line).
cmd_measure() {
    local dir="${1:?usage: $0 measure DIR [SECONDS]}" secs="${2:-30}" hz f pid st p
    dir="$(cd "$dir" && pwd)"
    hz="$(getconf CLK_TCK)"
    declare -A name t0
    for f in "$dir"/proc/*.pid; do
        read -r pid st <"$f"
        [[ "$(proc_start_time "$pid" 2>/dev/null)" == "$st" ]] && name[$pid]="$(basename "$f" .pid)"
    done
    local shims=" "
    for p in /proc/[0-9]*; do
        if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -q -- "-address $dir/containerd/containerd.sock "; then
            name[${p#/proc/}]=containerd-shim
            shims+="${p#/proc/} "
        fi
    done
    # Container processes: descendants of the shims.
    local added=1
    while ((added)); do
        added=0
        for p in /proc/[0-9]*; do
            pid=${p#/proc/}
            [[ -n "${name[$pid]:-}" ]] && continue
            local ppid
            ppid="$(awk '/^PPid:/ { print $2 }' "$p/status" 2>/dev/null)" || continue
            if [[ -n "$ppid" && -n "${name[$ppid]:-}" && ( "$shims" == *" $ppid "* || "${name[$ppid]}" == pod:* ) ]]; then
                name[$pid]="pod:$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null | cut -c1-40)"
                added=1
            fi
        done
    done
    tick() { awk '{ print $14 + $15 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
    for pid in "${!name[@]}"; do t0[$pid]="$(tick "$pid")"; done
    sleep "$secs"
    {
        for pid in "${!name[@]}"; do
            local t1 rss
            t1="$(tick "$pid")"
            rss="$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)"
            awk -v n="${name[$pid]}" -v a="${t0[$pid]}" -v b="$t1" -v hz="$hz" -v w="$secs" -v r="${rss:-0}" \
                'BEGIN { printf "%s\t%.2f\t%.1f\n", n, (b - a) / hz / w * 100, r / 1024 }'
        done
    } | sort -t$'\t' -k3,3nr | awk -F'\t' '
        BEGIN { printf "%-44s %6s %8s\n", "process", "cpu%", "rss_MiB" }
        { printf "%-44s %6.2f %8.1f\n", $1, $2, $3; cpu += $2; rss += $3 }
        END { printf "%-44s %6.2f %8.1f\n", "total", cpu, rss }'
}

cmd_import() {
    local dir="${1:?usage: $0 import DIR TAR...}"
    shift
    local tar
    for tar in "$@"; do
        ctr --address "$dir/containerd/containerd.sock" -n k8s.io images import "$tar" >&2 ||
            die "could not import $tar"
    done
}

main() {
    local cmd="${1:-}"
    shift || true
    case "$cmd" in
    install) cmd_install "$@" ;;
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    import) cmd_import "$@" ;;
    measure) cmd_measure "$@" ;;
    node-ip) printf '%s\n' "$NODE_IP" ;;
    pod-cidr) printf '%s\n' "$POD_CIDR" ;;
    exec) in_node "$@" ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
        exit 2
        ;;
    esac
}

main "$@"
