#!/usr/bin/env bash
# Installs and starts everything snapferry and its tests need, on Debian (run as root).
set -euo pipefail
cd "$(dirname "$0")/.."

export DEBIAN_FRONTEND=noninteractive
if ! command -v zfs-fuse >/dev/null || ! command -v pgrep >/dev/null || [ ! -x /usr/sbin/sshd ] \
    || ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null \
    || ! command -v debootstrap >/dev/null || ! command -v mke2fs >/dev/null || ! command -v btrfs >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq zfs-fuse procps openssh-server openssh-client \
        qemu-system-x86 qemu-utils debootstrap e2fsprogs btrfs-progs >/dev/null
fi

python3 -m pip install -q -e '.[test]' 2>/dev/null \
    || python3 -m pip install -q --break-system-packages -e '.[test]'

# A zfs-fuse daemon that was killed leaves its FUSE mounts behind ("Transport endpoint is not
# connected"); a fresh daemon cannot mount over them.
if ! zpool list >/dev/null 2>&1; then
    grep ' fuse.zfs ' /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l || true
    zfs-fuse
    for _ in $(seq 100); do zpool list >/dev/null 2>&1 && break; sleep 0.1; done
fi
zpool list >/dev/null || { echo "setup: the zfs-fuse daemon did not start" >&2; exit 1; }
echo "setup: ready (zfs-fuse running, snapferry installed: $(command -v snapferry))"
