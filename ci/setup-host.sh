#!/bin/sh
# Install the host packages cvmlab needs, from Debian's archive only.
#
# Idempotent: packages already present are not touched, and the
# bookworm-backports source is added once. On another distribution, or
# without root, it prints exactly what is missing and exits non-zero.
#
#   QEMU 10.0 (bookworm-backports): qemu-system-x86, qemu-utils
#   guest image: busybox-static, dropbear-bin, openssh-sftp-server, cpio,
#                gzip, xz-utils, zstd, kmod
#   guest helper and module builds: gcc, libc6-dev, make
#   Python: python3-venv
#   report browser test: chromium (headless screenshot of cvmlab report's HTML)
#   lab kernel and KVM selftest builds: flex, bison, bc, libelf-dev, libssl-dev, uuid-dev
set -eu

QEMU_MIN_MAJOR=10
BACKPORTS_LIST=/etc/apt/sources.list.d/cvmlab-bookworm-backports.list
BASE_PACKAGES="busybox-static dropbear-bin openssh-sftp-server cpio gzip xz-utils zstd kmod gcc libc6-dev make python3-venv chromium flex bison bc libelf-dev libssl-dev uuid-dev"
QEMU_PACKAGES="qemu-system-x86 qemu-utils"

say() { printf 'setup-host: %s\n' "$*"; }

missing_packages() {
    for pkg in "$@"; do
        status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
        [ "$status" = "install ok installed" ] || printf '%s ' "$pkg"
    done
}

qemu_major() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || { echo 0; return; }
    qemu-system-x86_64 --version | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'
}

. /etc/os-release 2>/dev/null || true
if [ "${ID:-}" != "debian" ] || [ "${VERSION_ID:-}" != "12" ]; then
    say "this script installs packages on Debian 12 (bookworm) only; this is '${PRETTY_NAME:-unknown}'."
    say "install by hand: QEMU >= ${QEMU_MIN_MAJOR}.0 (qemu-system-x86_64 with memory-backend-memfd, virtio-balloon, virtio-mem),"
    say "  qemu-img, busybox (static), dropbear, an sftp-server, cpio, gzip, xz, zstd, kmod, gcc with static libc, make, python3 venv."
    exit 1
fi

need_base=$(missing_packages $BASE_PACKAGES)
need_qemu=""
if [ "$(qemu_major)" -lt "$QEMU_MIN_MAJOR" ]; then
    need_qemu="$QEMU_PACKAGES"
fi

if [ -z "$need_base$need_qemu" ]; then
    say "all host packages present (QEMU $(qemu-system-x86_64 --version | head -n1 | awk '{print $4}'))."
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    say "missing: ${need_base}${need_qemu:+$need_qemu (from bookworm-backports)}"
    say "run this script as root (or: sudo $0) to install them."
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
if [ -n "$need_qemu" ] && ! grep -rqs '^deb .*bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    # The mirror apt already uses (or $CVMLAB_DEBIAN_MIRROR): no archive address lives here.
    mirror=$(PYTHONPATH="$(dirname "$0")/.." python3 -m orchestrator.archive_mirror) || exit 1
    say "adding bookworm-backports from $mirror to $BACKPORTS_LIST (for QEMU 10.0)"
    echo "deb $mirror bookworm-backports main" > "$BACKPORTS_LIST"
fi
say "apt-get update"
apt-get update -qq
if [ -n "$need_base" ]; then
    say "installing: $need_base"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need_base
fi
if [ -n "$need_qemu" ]; then
    say "installing from bookworm-backports: $need_qemu"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends -t bookworm-backports $need_qemu
fi
say "done: $(qemu-system-x86_64 --version | head -n1)"
