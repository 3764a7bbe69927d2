#!/bin/bash
# The one place that knows what a machine needs to build, test, benchmark and
# demonstrate imageupd: Debian packages, the Rust components, the real TripleO
# tools (PyPI), kernel features, and the cached fixture trees. `.ci/run`,
# `tests/demo-serve.sh` and the README all call this script; nothing else
# lists packages. Run as root on Debian bookworm. Idempotent: a second run on
# a set-up machine installs nothing, changes no package and exits 0.
#
#   tests/setup.sh            everything
#   tests/setup.sh packages   Debian packages, Rust components, kernel features
#   tests/setup.sh debian     only the Debian packages (e.g. inside a chroot)
#   tests/setup.sh fixtures   the fixture trees and the TripleO venv
#   tests/setup.sh check      exit 0 when every package is present (changes nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive LC_ALL=C
export PATH=$HOME/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
what=${1:-all}

# Every Debian package the tests, benchmarks and demos use, and why.
PACKAGES=(
    # fixture trees and the oracles' tools
    debootstrap rsync attr acl libcap2-bin e2fsprogs xfsprogs util-linux mount
    zstd tar gzip xz-utils perl ca-certificates procps kmod coreutils findutils
    gawk openssl binutils time curl
    # real services the tests talk to
    nginx systemd dbus python3 python3-venv python3-pip
    # disk images and the VM tests (see QEMU below)
    qemu-system-x86 qemu-utils fdisk gdisk
    # provisioning (issue 12): UEFI firmware for the boot test, a standalone
    # GRUB EFI image for the ESP, vfat for the ESP and the configdrive
    ovmf grub-efi-amd64-bin dosfstools mtools
    # power-loss replay (issue 13, tests/powerloss.rs): the guest's
    # initramfs carries a static busybox and dmsetup (+ its libraries) to put
    # dm-log-writes under the root
    busybox-static dmsetup
    # anchors the benchmarks compare against
    ostree wrk hyperfine
    # fleet rollout: a real etcd, and protoc for the etcd client crate's build
    etcd-server etcd-client protobuf-compiler
    # packaging (issue 14): dpkg-deb and dpkg-shlibdeps build the .deb;
    # systemd-analyze (systemd) verifies its units; man-db and groff-base
    # render its man pages;
    # promtool (prometheus) checks the metrics; sudo, because
    # diskimage-builder calls it even as root
    dpkg-dev man-db groff-base prometheus sudo
)

# Extra packages for a one-off need (and for the check that a package that
# cannot be installed is named): IMAGEUPD_SETUP_EXTRA="pkg1 pkg2".
# shellcheck disable=SC2206
PACKAGES+=(${IMAGEUPD_SETUP_EXTRA:-})

# QEMU is one source package whose binaries must share a version:
# qemu-utils from bookworm-backports (10.x) declares `Breaks:
# qemu-system-common (<< 1:8.0)`, and qemu-system-x86 exists only as
# bookworm's 7.2, so a machine image that ships the backported qemu-utils
# cannot take qemu-system-x86 at all. The tests need both qemu-img and
# qemu-system-x86_64, and neither needs anything newer than 7.2, so every
# QEMU package is aligned to the version qemu-system-x86 can be installed at
# (the installed one if present, else apt's candidate), downgrading qemu-utils
# where needed. Aligning to qemu-system-x86 rather than to qemu-utils keeps
# this working whichever one the image ships newer, and on a plain bookworm
# it changes nothing. qemu-system-data is arch:all and carries no binNMU
# suffix (7.2+dfsg-7+deb12u18 beside the binaries' …+b3), so apt's
# dependencies pick it rather than a pin.
QEMU_FAMILY=(qemu-utils qemu-block-extra qemu-system-common qemu-system-x86)

log() { echo "setup: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

installed_version() { dpkg-query -W -f='${db:Status-Status} ${Version}\n' "$1" 2>/dev/null | awk '$1 == "installed" { print $2 }'; }
candidate_version() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ { print $2 }'; }

# Packages of PACKAGES not installed, one a line.
missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        [ -n "$(installed_version "$p")" ] || echo "$p"
    done
}

# The QEMU packages installed at another version than qemu-system-x86's target,
# as `name=version` pins (empty when aligned).
qemu_pins() {
    local target p v
    target=$(installed_version qemu-system-x86)
    [ -n "$target" ] || target=$(candidate_version qemu-system-x86)
    [ -n "$target" ] && [ "$target" != "(none)" ] || die "no installable version of qemu-system-x86 (apt sources: $(grep -h '^Suites' /etc/apt/sources.list.d/*.sources 2>/dev/null | tr '\n' ' '))"
    for p in "${QEMU_FAMILY[@]}"; do
        v=$(installed_version "$p")
        if [ -n "$v" ] && [ "$v" != "$target" ]; then echo "$p=$target"; fi
    done
    # Not yet installed members are pinned too, so apt cannot pick a newer one.
    for p in qemu-utils qemu-system-x86; do
        [ -n "$(installed_version "$p")" ] || echo "$p=$target"
    done
}

apt_updated=0
apt_update() {
    [ "$apt_updated" = 1 ] && return 0
    local try
    # A mirror hiccup is not a broken machine: three tries, 5 s apart.
    for try in 1 2 3; do
        log "apt-get update$([ "$try" = 1 ] || echo " (try $try)")"
        if apt-get update -q >/tmp/imageupd-setup-apt-update.log 2>&1 &&
            ! grep -q '^[WE]: Failed to fetch' /tmp/imageupd-setup-apt-update.log; then
            apt_updated=1
            return 0
        fi
        sleep 5
    done
    cat /tmp/imageupd-setup-apt-update.log >&2
    die "apt-get update failed three times (log above)"
}

# Install the given packages in one transaction; when that fails, try each
# alone so the message names the package that cannot be installed.
apt_install() {
    local log_file=/tmp/imageupd-setup-apt.log p failed=()
    if apt-get install -y -q --no-install-recommends --allow-downgrades "$@" >"$log_file" 2>&1; then
        return 0
    fi
    # A download that failed half-way is retried once with fresh lists.
    if grep -q 'Failed to fetch\|Unable to fetch' "$log_file"; then
        log "a download failed; refreshing the package lists and trying again"
        apt_updated=0
        apt_update
        apt-get install -y -q --no-install-recommends --allow-downgrades "$@" >"$log_file" 2>&1 && return 0
    fi
    log "installing ${*} in one step failed; trying each package to find the culprit"
    for p in "$@"; do
        if ! apt-get install -y -q --no-install-recommends --allow-downgrades "$p" >"$log_file.one" 2>&1; then
            failed+=("$p")
            log "cannot install package '$p':"
            grep -E '^(E:| [^ ].*:|The following)' "$log_file.one" | sed 's/^/setup:     /' >&2 || tail -5 "$log_file.one" >&2
        fi
    done
    [ ${#failed[@]} = 0 ] || die "could not install: ${failed[*]} (full log: $log_file)"
}

setup_debian() {
    local missing pins
    missing=$(missing_packages)
    # Without a package list apt-cache knows no candidates: update first when
    # anything is to be installed or the QEMU family needs a look-up.
    if [ -n "$missing" ] || [ -z "$(installed_version qemu-system-x86)" ]; then apt_update; fi
    pins=$(qemu_pins)
    if [ -n "$pins" ]; then
        log "aligning QEMU packages to qemu-system-x86's version: $(echo $pins)"
        # shellcheck disable=SC2086
        apt_install $pins
        missing=$(missing_packages)
    fi
    if [ -n "$missing" ]; then
        log "installing: $(echo $missing)"
        apt_update
        # shellcheck disable=SC2086
        apt_install $missing
    else
        log "all ${#PACKAGES[@]} Debian packages present"
    fi
    missing=$(missing_packages)
    [ -z "$missing" ] || die "still missing after install: $(echo $missing)"
    for tool in qemu-img qemu-system-x86_64 etcd etcdctl protoc debootstrap nginx; do
        command -v "$tool" >/dev/null || die "'$tool' is not on PATH after installing its package"
    done
    qemu-img --version >/dev/null || die "qemu-img does not run"
    qemu-system-x86_64 --version >/dev/null || die "qemu-system-x86_64 does not run"
    log "Debian packages ready: qemu $(installed_version qemu-system-x86), etcd $(installed_version etcd-server)"
}

setup_host() {
    # Rust components for the lint steps.
    if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
        log "rustup component add rustfmt clippy"
        rustup component add rustfmt clippy || die "rustup could not add rustfmt/clippy"
    fi

    # Loop devices for the ext4/xfs and disk-image tests.
    modprobe loop 2>/dev/null || true
    [ -e /dev/loop-control ] || die "no /dev/loop-control: loop devices are required"
    losetup -f >/dev/null || die "no free loop device"
}

setup_fixtures() {
    tests/fixtures/build-trees.sh
    tests/fixtures/build-vm-trees.sh
    # The cloud-init tree of the provisioning boot test (tests/provision_vm.rs),
    # built over the k47 VM tree; cached like the others (~30 s when cold).
    tests/fixtures/build-prov-tree.sh
    tests/fixtures/tripleo-venv.sh "${IMAGEUPD_TEST_VENV:-/opt/imageupd-venv}"
}

if [ "$(id -u)" != 0 ]; then die "run as root (packages, loop devices, chroots)"; fi
case $what in
    all) setup_debian; setup_host; setup_fixtures ;;
    packages) setup_debian; setup_host ;;
    debian) setup_debian ;;
    fixtures) setup_fixtures ;;
    check)
        missing=$(missing_packages)
        [ -z "$missing" ] || { log "missing: $(echo $missing)"; exit 1; }
        [ -z "$(qemu_pins)" ] || { log "QEMU packages not aligned: $(qemu_pins | tr '\n' ' ')"; exit 1; }
        log "all ${#PACKAGES[@]} Debian packages present and aligned"
        ;;
    *) die "usage: tests/setup.sh [all|packages|fixtures|check]" ;;
esac
