#!/bin/bash
# The OpenZFS test VM's init proper, carried on the payload disk and exec'd as PID 1 by /sbin/snapferry-init:
# loads zfs, installs the payload's wheels (no network), runs run.sh and writes rc, log and results/ to /dev/vdc.
#
# Payload layout (/tmp/payload): init.sh, run.sh, requirements.txt, wheels/, work/ (run.sh's working directory).
# run.sh sees $RESULTS (a directory whose files come back to the host) and the venv first on PATH.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PAYLOAD=/tmp/payload
OUT=/tmp/out
LOG=$OUT/log
export RESULTS=$OUT/results
mkdir -p "$RESULTS"
: >"$LOG"

say() { echo "openzfs-vm: [$(cut -d' ' -f1 /proc/uptime)s] $*" | tee -a "$LOG"; }

# Everything goes to the log and, live, to the serial console (the host keeps that even on a timeout).
logged() {
    "$@" 2>&1 | tee -a "$LOG"
    return "${PIPESTATUS[0]}"
}

power_off() {
    sync
    echo o >/proc/sysrq-trigger
    sleep 30
    echo b >/proc/sysrq-trigger
    sleep 30
}

finish() {
    echo "$1" >"$OUT/rc"
    if ! tar -cf /dev/vdc -C "$OUT" rc log results; then
        echo "openzfs-vm: could not write the results to /dev/vdc (too small?)" >/dev/console
    fi
    power_off
}

setup_failed() {
    echo "$*" >"$OUT/setup_error"
    say "setup failed: $*"
    echo 125 >"$OUT/rc"
    tar -cf /dev/vdc -C "$OUT" rc setup_error log results
    power_off
}

say "init started (kernel $(uname -r))"
# The initramfs normally hands over /run; zfs and pip expect it writable.
mountpoint -q /run || mount -t tmpfs tmpfs /run
logged modprobe zfs || setup_failed "modprobe zfs"
say "zfs loaded: $(cat /sys/module/zfs/version 2>/dev/null)"

# The image carries a venv with pip made at build time; pip writes into the root file system's throwaway
# snapshot overlay. The fallback (an image without it) costs ensurepip's minute under TCG.
VENV=/opt/snapferry-venv
if [ ! -x "$VENV/bin/pip" ]; then
    VENV=/tmp/venv
    logged python3 -m venv "$VENV" || setup_failed "python3 -m venv"
    say "venv created"
fi
export PATH=$VENV/bin:$PATH VIRTUAL_ENV=$VENV
logged pip install -q --no-index --no-compile --find-links "$PAYLOAD/wheels" snapferry -r "$PAYLOAD/requirements.txt" \
    || setup_failed "pip install of the payload's wheels"
say "wheels installed"

cd "$PAYLOAD/work" || setup_failed "no work/ in the payload"
say "running run.sh"
logged bash "$PAYLOAD/run.sh"
RC=$?
say "run.sh exited $RC"
finish "$RC"
