#!/usr/bin/env bash
# Builds (once, then caches) the Debian bookworm VM image with real OpenZFS that tests/openzfs_vm.py boots.
#
#   scripts/openzfs-vm/build-image.sh 2.3   # zfs-dkms + zfsutils-linux from bookworm-backports
#   scripts/openzfs-vm/build-image.sh 2.1   # zfs-dkms + zfsutils-linux from bookworm contrib
#
# Output: ${SNAPFERRY_VM_CACHE:-/var/cache/snapferry-vm}/zfs-VERSION/{vmlinuz,initrd.img,rootfs.img,zfs-version.txt}
# and a .complete stamp, written last: with the stamp there this script is a no-op.
# Every failure ends with one line "openzfs-vm: building the zfs-VERSION image failed: ..." and a non-zero exit.
set -Eeuo pipefail

# One brace group: bash reads all of it before running, so editing this file cannot derail a running build.
{
# The ERR trap can fire inside a step whose output goes to the build log: messages go to fd 8, the real stderr.
exec 8>&2
VERSION=${1:-}
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${SNAPFERRY_VM_CACHE:-/var/cache/snapferry-vm}
MIRROR=${SNAPFERRY_VM_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SNAPFERRY_VM_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
OUT=$CACHE/zfs-$VERSION
LOG=$CACHE/zfs-$VERSION.build.log
STEP="starting"
WORK=""
ROOT=""

fail() {
    # In a command substitution the outer command fails too and reports; one message is enough.
    [ "$BASHPID" = "$$" ] || exit 1
    # Only the last line matters to a reader of CI output, so it names the step and the log.
    if [ -s "$LOG" ]; then
        echo "---- last lines of $LOG ----" >&8
        tail -n 30 "$LOG" >&8 || true
        echo "----" >&8
    fi
    echo "openzfs-vm: building the zfs-$VERSION image failed: $*" >&8
    exit 1
}
die() { fail "$*; full log: $LOG"; }

case "$VERSION" in
    2.3 | 2.1) ;;
    *) VERSION="${VERSION:-?}"; fail "unknown version (usage: $0 2.3|2.1)" ;;
esac

[ -e "$OUT/.complete" ] && exit 0
[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, chroot)"

mkdir -p "$CACHE" || fail "cannot create the cache directory $CACHE"
exec 9>"$CACHE/zfs-$VERSION.lock"
flock 9 || fail "cannot lock $CACHE/zfs-$VERSION.lock"
# Another build may have finished while we waited for the lock.
[ -e "$OUT/.complete" ] && exit 0

: >"$LOG"
trap 'fail "$STEP (command \`$BASH_COMMAND\` exited $?); full log: $LOG"' ERR

unmount_chroot() {
    [ -n "$ROOT" ] || return 0
    local m
    # Deepest first; a lazy unmount is enough because nothing in the chroot is still running.
    for m in $(awk -v r="$ROOT" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$m" || true
    done
}

cleanup() {
    local rc=$?
    trap - ERR
    unmount_chroot
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        # Never delete through a mount that is still there (e.g. a bind of the host's /dev).
        if awk -v r="$WORK" 'index($2, r) == 1 {found = 1} END {exit !found}' /proc/mounts; then
            echo "openzfs-vm: leaving $WORK in place: something is still mounted under it" >&8
        else
            rm -rf "$WORK"
        fi
    fi
    exit $rc
}
trap cleanup EXIT

in_root() { chroot "$ROOT" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "$@"; }
apt_in_root() { in_root apt-get -y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    --no-install-recommends "$@"; }

START=$(date +%s)

STEP="installing host packages (qemu-system-x86 qemu-utils debootstrap e2fsprogs)"
if ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null \
    || ! command -v debootstrap >/dev/null || ! command -v mke2fs >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >>"$LOG" 2>&1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-x86 qemu-utils debootstrap e2fsprogs >>"$LOG" 2>&1
fi

WORK=$(mktemp -d "$CACHE/zfs-$VERSION.build.XXXXXX")
ROOT=$WORK/root

STEP="debootstrap bookworm minbase from $MIRROR"
echo "openzfs-vm: zfs-$VERSION: debootstrap (log: $LOG)"
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR" >>"$LOG" 2>&1

STEP="preparing the chroot"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
# Services must not start inside the chroot (they would run on the host).
printf '#!/bin/sh\nexit 101\n' >"$ROOT/usr/sbin/policy-rc.d"
chmod 755 "$ROOT/usr/sbin/policy-rc.d"
# contrib and backports exist only in the image: the host's apt sources stay as they are.
case "$VERSION" in
    2.3)
        COMPONENTS="main"
        BACKPORTS="deb $MIRROR bookworm-backports main contrib"
        ZFS_TARGET=(-t bookworm-backports)
        ;;
    2.1)
        COMPONENTS="main contrib"
        BACKPORTS=""
        ZFS_TARGET=()
        ;;
esac
cat >"$ROOT/etc/apt/sources.list" <<SOURCES
deb $MIRROR bookworm $COMPONENTS
deb $MIRROR bookworm-updates $COMPONENTS
deb $SECURITY_MIRROR bookworm-security $COMPONENTS
$BACKPORTS
SOURCES
echo snapferry-vm >"$ROOT/etc/hostname"
in_root debconf-set-selections <<'DEBCONF'
zfs-dkms zfs-dkms/note-incompatible-licenses note
DEBCONF
STEP="apt-get update in the chroot"
# A mirror that cannot be reached must fail the build, not quietly leave out its updates.
apt_in_root update --error-on=any >>"$LOG" 2>&1

STEP="installing the kernel, its headers and the VM's tools"
echo "openzfs-vm: zfs-$VERSION: kernel and tools"
apt_in_root install linux-image-amd64 linux-headers-amd64 python3 python3-venv \
    e2fsprogs util-linux mount tar coreutils kmod >>"$LOG" 2>&1
# Made here, at native speed: under TCG ensurepip alone takes about a minute at every boot.
in_root python3 -m venv /opt/snapferry-venv >>"$LOG" 2>&1
KVERS=$(ls "$ROOT/lib/modules")
[ "$(echo "$KVERS" | wc -w)" = 1 ] || die "expected one kernel in the image, found: $KVERS"
KVER=$KVERS

STEP="installing zfs-dkms zfsutils-linux ${ZFS_TARGET[*]:-from bookworm contrib} (dkms build for $KVER)"
echo "openzfs-vm: zfs-$VERSION: zfs-dkms build for $KVER (several minutes)"
apt_in_root install "${ZFS_TARGET[@]}" zfs-dkms zfsutils-linux >>"$LOG" 2>&1

STEP="checking the dkms build"
# The package installs even when dkms could not build, so look for the module itself.
ZFS_KO=$(find "$ROOT/lib/modules/$KVER" -name 'zfs.ko*')
[ -n "$ZFS_KO" ] || die "dkms did not build zfs.ko for $KVER"
in_root depmod "$KVER" >>"$LOG" 2>&1
ZFS_DKMS=$(in_root dpkg-query -W -f '${Version}' zfs-dkms)
ZFS_UTILS=$(in_root dpkg-query -W -f '${Version}' zfsutils-linux)
case "$ZFS_DKMS" in
    "$VERSION".*) ;;
    *) die "expected zfs-dkms $VERSION.x, got $ZFS_DKMS" ;;
esac

STEP="checking the initrd"
# The initrd must find the root disk, which is virtio; Debian's MODULES=most includes virtio_blk.
INITRD_FILES=$(in_root lsinitramfs "/boot/initrd.img-$KVER")
case "$INITRD_FILES" in
    *virtio_blk*) ;;
    *) die "the initrd has no virtio_blk" ;;
esac

STEP="finishing the root file system"
install -m 755 "$HERE/stub-init.sh" "$ROOT/sbin/snapferry-init"
rm -f "$ROOT/usr/sbin/policy-rc.d"
in_root apt-get clean
rm -rf "$ROOT/var/lib/apt/lists/"* "$ROOT/var/cache/apt/"*.bin
cp "$ROOT/boot/vmlinuz-$KVER" "$WORK/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$WORK/initrd.img"
{
    echo "zfs-dkms $ZFS_DKMS"
    echo "zfsutils-linux $ZFS_UTILS"
    echo "kernel $KVER"
} >"$WORK/zfs-version.txt"
unmount_chroot

STEP="making the ext4 image (mke2fs -d)"
# Room for what tests write outside /tmp (pool cache, mount points); the VM writes to a snapshot overlay anyway.
SIZE_MB=$(($(du -sm "$ROOT" | cut -f1) * 12 / 10 + 512))
mke2fs -q -t ext4 -L snapferry-root -d "$ROOT" -F "$WORK/rootfs.img" "${SIZE_MB}M" >>"$LOG" 2>&1

STEP="moving the image into $OUT"
rm -rf "$OUT"
mkdir -p "$OUT"
mv "$WORK/vmlinuz" "$WORK/initrd.img" "$WORK/rootfs.img" "$WORK/zfs-version.txt" "$OUT/"
sync
date -u +%FT%TZ >"$OUT/.complete"

ELAPSED=$(($(date +%s) - START))
echo "openzfs-vm: built the zfs-$VERSION image in ${ELAPSED}s: $(tr '\n' ' ' <"$OUT/zfs-version.txt")"
exit 0
}
