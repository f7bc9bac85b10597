#!/usr/bin/env bash
# Sets up everything the tests need on a Debian host, as root, then lints and runs the whole test suite.
# CI runs exactly this (.ci/run). The test-only parts are here, not in scripts/setup.sh: an OpenSSH
# server (the sync tests start their own on 127.0.0.1), OpenStack Swift (the S3 tests start their own
# store on 127.0.0.1, snapferry_testkit/swift_server.py), qemu and debootstrap (the real-OpenZFS VMs),
# and the [test] extras (pytest, hypothesis, ruff, mypy, atheris).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DEBIAN_FRONTEND=noninteractive
if [ ! -x /usr/sbin/sshd ] || ! command -v qemu-system-x86_64 >/dev/null || ! command -v qemu-img >/dev/null \
    || ! command -v debootstrap >/dev/null || ! command -v mke2fs >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq openssh-server qemu-system-x86 qemu-utils debootstrap e2fsprogs >/dev/null
fi
if [ ! -x /usr/bin/swift-proxy-server ] || [ ! -x /usr/bin/swift-account-server ] || [ ! -x /usr/bin/swift-container-server ] \
    || [ ! -x /usr/bin/swift-object-server ] || [ ! -e /etc/swift/swift.conf ]; then
    # The packages would start their services (and rsyslog) where an init system runs; the tests
    # start their own servers. A policy-rc.d that says no (exit 101) keeps everything down meanwhile.
    own_policy=
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
    fi
    status=0
    { apt-get update -qq && apt-get install -y -qq swift swift-proxy swift-object swift-container swift-account >/dev/null; } || status=$?
    if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi
    [ "$status" -eq 0 ]
fi
python3 -m pip install -q -e '.[test]' 2>/dev/null || python3 -m pip install -q --break-system-packages -e '.[test]'
ruff check src tests bench fuzz
mypy
# The real-OpenZFS VM images (cached in /var/cache/snapferry-vm; about 5 minutes each the first
# time). A failed download stops here, loudly, before any test runs.
for version in 2.3 2.1; do
    started=$SECONDS
    bash scripts/openzfs-vm/build-image.sh "$version"
    echo "test: OpenZFS $version VM image ready ($((SECONDS - started)) s)"
done
python3 -m pytest -q tests "$@"
