#!/bin/bash
# Set up a Debian bookworm machine to build, test and benchmark imageupd:
# system packages, then the cached fixture trees. Run as root.
#
#   tests/setup.sh            packages + fixtures
#   tests/setup.sh packages   only the packages
#   tests/setup.sh fixtures   only the fixture trees
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
what=${1:-all}

if [ "$what" = all ] || [ "$what" = packages ]; then
    apt-get update -q
    apt-get install -y -q --no-install-recommends \
        debootstrap rsync attr acl libcap2-bin e2fsprogs nginx hyperfine time \
        util-linux mount zstd tar gzip xz-utils perl ca-certificates procps kmod \
        coreutils findutils gawk openssl python3 python3-venv python3-pip systemd \
        qemu-system-x86 dbus binutils \
        qemu-utils fdisk gdisk xfsprogs ostree wrk
fi
if [ "$what" = all ] || [ "$what" = fixtures ]; then
    tests/fixtures/build-trees.sh
    tests/fixtures/build-vm-trees.sh
    tests/fixtures/tripleo-venv.sh
fi
