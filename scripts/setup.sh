#!/usr/bin/env bash
# Installs everything ocibox needs to build, demo and test on a fresh Debian 12 machine.
# Idempotent: a second run only checks. Run as root, or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Debian packages. Grouped by what needs them.
PKGS=(
  # Python: the interpreter every user runs ocibox with, and its few libraries
  python3 python3-venv python3-zstandard python3-jsonschema
  # gzip layers inflated by ISA-L's igzip (ocibox.layers; zlib when missing)
  isal
  # C runtime: compiler and static libraries
  gcc make pkg-config libjansson-dev libseccomp-dev libcap-dev libfuse3-dev libsquashfuse-dev
  libzstd-dev zlib1g-dev liblzma-dev liblz4-dev liblzo2-dev
  # rootless: subordinate ids and their helpers, FUSE
  uidmap fuse3 util-linux
  # test fixtures: a real registry, image builders, TLS certs, htpasswd
  docker-registry skopeo busybox-static debootstrap openssl apache2-utils
  # reference peers for tests and benchmarks
  umoci runc crun podman bubblewrap squashfs-tools squashfs-tools-ng squashfuse fuse-overlayfs hyperfine
  charliecloud-doc jq
  # OCI schemas and test vectors
  golang-github-opencontainers-image-spec-dev golang-github-opencontainers-specs-dev
  golang-github-docker-distribution-dev
  # test fixtures: the token server signs its JWTs (RS256) with python3-cryptography
  python3-cryptography
)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The multi-arch test image carries the real arm64 busybox-static: enable the architecture and keep
# the .deb where the test fixtures look for it (tests/support/busybox.py).
ARM64_DEBS=/var/cache/ocibox-tests/debs
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
  $SUDO apt-get update -qq
fi
if ! ls "$ARM64_DEBS"/busybox-static_*_arm64.deb >/dev/null 2>&1; then
  $SUDO mkdir -p "$ARM64_DEBS"
  (cd "$ARM64_DEBS" && $SUDO apt-get download -qq busybox-static:arm64 2>/dev/null) ||
    (cd "$ARM64_DEBS" && $SUDO apt-get update -qq && $SUDO apt-get download -qq busybox-static:arm64)
fi

# Cross-building the runtime (runtime/README.md, "Cross-building"): for arm64 on an amd64 host, for
# amd64 on an arm64 host. Debian's cross compiler and the other architecture's static libraries that
# the runtime links; qemu-user runs the cross-built runtime on its own, qemu-system-aarch64 an arm64
# VM booting Debian's arm64 kernel (tests/test_arm64.py).
case "$(dpkg --print-architecture)" in
  amd64) CROSS_ARCH=arm64; CROSS_PKGS=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross) ;;
  arm64) CROSS_ARCH=amd64; CROSS_PKGS=(gcc-x86-64-linux-gnu libc6-dev-amd64-cross) ;;
  *) CROSS_ARCH=""; CROSS_PKGS=() ;;
esac
if [ -n "$CROSS_ARCH" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx "$CROSS_ARCH"; then
    $SUDO dpkg --add-architecture "$CROSS_ARCH"
    $SUDO apt-get update -qq
  fi
  for lib in libjansson-dev libseccomp-dev libfuse3-dev libsquashfuse-dev libzstd-dev zlib1g-dev liblzma-dev \
    liblz4-dev liblzo2-dev; do
    CROSS_PKGS+=("$lib:$CROSS_ARCH")
  done
fi
CROSS_PKGS+=(qemu-user-static qemu-system-arm)
missing=()
for p in "${CROSS_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { $SUDO apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }
fi
# The arm64 VM's kernel: the .deb of Debian's generic arm64 flavour (tests/support/vm.py unpacks it).
if ! ls "$ARM64_DEBS" | grep -Eq '^linux-image-[0-9][^_]*[0-9]-arm64_.*_arm64\.deb$'; then
  kernel=$(apt-cache depends linux-image-arm64:arm64 | sed -n 's/.*Depends: \(linux-image-[^:]*\).*/\1/p' | head -n 1)
  (cd "$ARM64_DEBS" && $SUDO apt-get download -qq "$kernel:arm64" 2>/dev/null)
fi

# libsquashfuse-dev is not co-installable across architectures: when the arm64 one (for the
# cross-built runtime) is installed, the native static libraries go to /usr/local/lib/<triplet>,
# which gcc searches, extracted from the native package.
NATIVE_TRIPLET=$(gcc -dumpmachine)
if [ ! -e "/usr/lib/$NATIVE_TRIPLET/libsquashfuse_ll.a" ] && [ ! -e "/usr/local/lib/$NATIVE_TRIPLET/libsquashfuse_ll.a" ]; then
  sqtmp=$(mktemp -d)
  (cd "$sqtmp" && $SUDO apt-get download -qq "libsquashfuse-dev:$(dpkg --print-architecture)" 2>/dev/null &&
    dpkg-deb -x libsquashfuse-dev_*.deb x &&
    $SUDO mkdir -p "/usr/local/lib/$NATIVE_TRIPLET" &&
    $SUDO cp x/usr/lib/"$NATIVE_TRIPLET"/libsquashfuse*.a "/usr/local/lib/$NATIVE_TRIPLET/")
  rm -rf "$sqtmp"
fi

# Debian's docker-registry package starts a system service on :5000; the tests start their own.
if command -v systemctl >/dev/null && systemctl is-active -q docker-registry 2>/dev/null; then
  $SUDO systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

# The development environment: Debian's python3 (readable by every user, so the rootless tests
# can run the same interpreter), with the project installed editable.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
if ! .venv/bin/python -c 'import ocibox, pytest, ruff' 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check -e . "pytest>=7" ruff
fi

# Byte-compile once: with PYTHONDONTWRITEBYTECODE set (as in some CI images), Python would
# otherwise recompile every module at every start, which costs `ocibox run` 30-60 ms.
.venv/bin/python -m compileall -q src >/dev/null

# Machine quirks that common distributions don't have (see README, "This machine").
# /dev/fuse is 0666 on Debian, Ubuntu and Fedora; some images ship it 0600.
if [ -e /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != "666" ]; then
  $SUDO chmod 0666 /dev/fuse
fi
if [ -e /proc/sys/kernel/unprivileged_userns_clone ] && [ "$(cat /proc/sys/kernel/unprivileged_userns_clone)" != 1 ]; then
  $SUDO sysctl -qw kernel.unprivileged_userns_clone=1
fi

# The unprivileged user the rootless tests run as, with subordinate id ranges like a desktop user.
TEST_USER=ocibox-test
if ! id "$TEST_USER" >/dev/null 2>&1; then
  $SUDO useradd --create-home --shell /bin/bash "$TEST_USER"
fi
for f in /etc/subuid /etc/subgid; do
  $SUDO touch "$f"
  grep -q "^$TEST_USER:" "$f" || echo "$TEST_USER:200000:65536" | $SUDO tee -a "$f" >/dev/null
done

# The C runtime.
if [ -f runtime/Makefile ]; then make -s -C runtime; fi
