#!/usr/bin/env bash
# Builds a real kube-apiserver, kubectl, and the node and control-plane binaries of a real cluster
# (kubelet, kube-proxy, kube-controller-manager, kube-scheduler, and the pause image's binary) from
# Debian bookworm's `kubernetes` source package, for the agent's tests, the cluster test and the
# benchmarks. No prebuilt binary can be downloaded here and no
# container engine runs, so this is the only way to a real API server (see README, "sluice agent").
#
# The binaries are cached OUTSIDE the repo, so only a fresh machine pays the build (5 to 8 minutes on 2 cores):
#   $SLUICE_KUBE_CACHE (default /var/cache/sluice-kube/1.20.2)/{kube-apiserver,kubectl,kubelet,...}
# Idempotent; returns at once when the cache is complete. Prints the cache directory on stdout.
set -euo pipefail

VERSION=1.20.2
CACHE="${SLUICE_KUBE_CACHE:-/var/cache/sluice-kube/$VERSION}"
BINARIES=(kube-apiserver kubectl kubelet kube-proxy kube-controller-manager kube-scheduler)

log() { printf '[kube-apiserver] %s\n' "$*" >&2; }

complete() {
  for b in "${BINARIES[@]}" pause; do [ -x "$CACHE/$b" ] || return 1; done
  command -v etcd >/dev/null 2>&1 || return 1
}

if complete; then
  echo "$CACHE"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "error: building kube-apiserver installs apt packages into the system: run as root" >&2
  exit 1
fi

mkdir -p "$CACHE"
# One build at a time (bootstrap and a test harness may both ask for it).
exec 9>"$CACHE/.lock"
flock 9
if complete; then
  echo "$CACHE"
  exit 0
fi

apt_packages=(dpkg-dev golang-go rsync jq etcd-server etcd-client golang-github-modern-go-reflect2-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Debian would start a system etcd on install; tests run their own on free ports.
  "$(dirname "$0")/no-service-starts.sh" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

work="$CACHE/build"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/src"

# A private apt configuration with just one deb-src line, so the machine's own sources stay untouched.
uri=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
uri="${uri:-http://deb.debian.org/debian}"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bookworm main" >"$work/apt/sources.list"
apt_private=(
  -o "Dir::Etc::SourceList=$work/apt/sources.list"
  -o "Dir::Etc::SourceParts=/dev/null"
  -o "Dir::State::Lists=$work/apt/lists"
  -o "Dir::Cache=$work/apt/cache"
)
log "fetching the kubernetes source package (bookworm)"
apt-get "${apt_private[@]}" update -qq
(cd "$work/src" && apt-get "${apt_private[@]}" source -qq kubernetes/bookworm >/dev/null 2>&1)
tree=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)
[ -n "$tree" ] || { echo "error: no kubernetes-* tree after apt-get source in $work/src" >&2; exit 1; }

# The vendored reflect2 1.0.1 crashes (SIGSEGV) under Go >= 1.18 when a custom resource is written;
# replace it with Debian's 1.0.2.
reflect2_src=$(dpkg -L golang-github-modern-go-reflect2-dev | grep '/reflect2.go$' | head -n1 | xargs dirname)
reflect2_dst="$tree/vendor/github.com/modern-go/reflect2"
[ -d "$reflect2_dst" ] || { echo "error: $reflect2_dst missing in the source tree" >&2; exit 1; }
find "$reflect2_dst" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -delete
find "$reflect2_src" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) -exec cp {} "$reflect2_dst/" \;

log "building ${BINARIES[*]} (10 to 15 minutes on 2 cores)"
(
  cd "$tree"
  export CGO_ENABLED=0 GOPROXY=off GOFLAGS= GOCACHE="$work/gocache" GOPATH="$work/gopath"
  make WHAT="${BINARIES[*]/#/cmd/}" >"$work/make.log" 2>&1 ||
    { tail -n 40 "$work/make.log" >&2; echo "error: make failed, full log in $work/make.log" >&2; exit 1; }
)
for b in "${BINARIES[@]}"; do
  install -m 0755 "$tree/_output/bin/$b" "$CACHE/$b.tmp"
  mv "$CACHE/$b.tmp" "$CACHE/$b"
done
# The pod sandbox ("pause") image's process, static, from the same tree.
gcc -Os -static "$tree/build/pause/linux/pause.c" -o "$CACHE/pause.tmp"
mv "$CACHE/pause.tmp" "$CACHE/pause"
rm -rf "$work"
log "cached in $CACHE"
echo "$CACHE"
