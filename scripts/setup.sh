#!/usr/bin/env bash
# Sets up snapferry on a Debian host, as root (with or without sudo): the tools it drives, and snapferry
# with its runtime dependencies. Nothing for the tests (that is scripts/test.sh).
#
#   bash scripts/setup.sh            # install what is missing, then start the zfs-fuse daemon if zfs-fuse is the ZFS here
#   bash scripts/setup.sh --dry-run  # say what it found and what it would install, and change nothing
#
# ZFS: an OpenZFS already here (`zfs version` answers) is used as it is; zfs-fuse is installed only where
# there is no ZFS at all. btrfs-progs and the ssh client are installed when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
if [ "$(id -u)" != 0 ] && [ "$DRY_RUN" = 0 ]; then
    if command -v sudo >/dev/null; then
        exec sudo -E bash "$0" "$@"
    fi
    echo "setup: run this as root (it installs packages and starts the zfs-fuse daemon)" >&2
    exit 1
fi

say() { echo "setup: $*"; }

# Which ZFS is here decides everything else: never a second implementation beside OpenZFS.
zfs_kind=none
if command -v zfs >/dev/null && openzfs=$(zfs version 2>/dev/null | head -n1) && [[ "$openzfs" == zfs-* ]]; then
    zfs_kind=openzfs
    say "found OpenZFS ($openzfs): using it, not installing zfs-fuse"
elif command -v zfs-fuse >/dev/null; then
    zfs_kind=zfs-fuse
    say "found zfs-fuse ($(command -v zfs-fuse))"
fi

packages=()
[ "$zfs_kind" = none ] && packages+=(zfs-fuse)
command -v btrfs >/dev/null || packages+=(btrfs-progs)
command -v ssh >/dev/null || packages+=(openssh-client)
command -v pgrep >/dev/null || packages+=(procps)
# The C fletcher-4 extension (setup.py) needs a compiler and this python's headers; without them
# snapferry still installs, but sums with numpy at several times the CPU.
command -v cc >/dev/null || command -v gcc >/dev/null || packages+=(gcc)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' ||
    packages+=(python3-dev)
if [ ${#packages[@]} -eq 0 ]; then
    say "system packages: nothing to install"
else
    say "system packages to install: ${packages[*]}"
fi
say "python packages: snapferry and its runtime dependencies ($(python3 -c 'import tomllib; print(", ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))'))"
if [ "$DRY_RUN" = 1 ]; then
    say "dry run: nothing changed"
    exit 0
fi

if [ ${#packages[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${packages[@]}" >/dev/null
    [ "$zfs_kind" = none ] && zfs_kind=zfs-fuse
fi

python3 -m pip install -q -e . 2>/dev/null || python3 -m pip install -q --break-system-packages -e .
if python3 -c 'from snapferry.zfs.codec import fletcher; raise SystemExit(not fletcher.native_available())'; then
    say "fletcher-4: the C extension is built"
else
    say "warning: the C fletcher-4 extension did not build; snapferry works, with more CPU per GB" >&2
fi

if [ "$zfs_kind" = zfs-fuse ] && ! zpool list >/dev/null 2>&1; then
    # A zfs-fuse daemon that was killed leaves its FUSE mounts behind ("Transport endpoint is not
    # connected"); a fresh daemon cannot mount over them.
    grep ' fuse.zfs ' /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l || true
    zfs-fuse
    for _ in $(seq 100); do zpool list >/dev/null 2>&1 && break; sleep 0.1; done
    zpool list >/dev/null || { echo "setup: the zfs-fuse daemon did not start" >&2; exit 1; }
    say "started the zfs-fuse daemon"
fi
say "ready: $(command -v snapferry) ($(snapferry --version)), ZFS: $zfs_kind"
