#!/bin/sh
# PID 1 of the OpenZFS test VM, baked into the image as /sbin/snapferry-init. It only unpacks the
# payload disk and hands over to the payload's init.sh, so the real init can change without a rebuild.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH

# Debian's initramfs has usually moved /proc, /sys and /dev over already.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mountpoint -q /tmp || mount -t tmpfs -o mode=1777 tmpfs /tmp

mkdir -p /tmp/payload
if tar -xf /dev/vdb -C /tmp/payload && [ -f /tmp/payload/init.sh ]; then
    exec /bin/bash /tmp/payload/init.sh
fi
echo "openzfs-vm: no payload with an init.sh on /dev/vdb; powering off" >/dev/console
sync
# PID 1 must never exit (kernel panic); without systemd, sysrq is the way to power off.
echo o >/proc/sysrq-trigger
sleep 30
echo b >/proc/sysrq-trigger
