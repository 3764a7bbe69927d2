#!/bin/bash
# Runs tests/setup.sh on a machine it has already set up and checks that the
# second run changes nothing: the same installed packages at the same
# versions (dpkg's view), the same fixture stamps, exit 0. Used by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${IMAGEUPD_TEST_CACHE:-/var/cache/imageupd-test}
VMCACHE=$CACHE/vm
snapshot() {
    dpkg-query -W -f='${Package} ${Version} ${db:Status-Status}\n' | sort
    # Fixture stamps and completion markers: rebuilt trees rewrite them.
    for d in "$CACHE" "$VMCACHE"; do
        [ -d "$d" ] && find "$d" -maxdepth 1 -name '.*' ! -name '.lock*' -type f -printf '%p %T@ %s\n' | sort
    done
}
tests/setup.sh check || { echo "setup-idempotent: the machine is not set up; run tests/setup.sh first" >&2; exit 1; }
before=$(mktemp); after=$(mktemp)
trap 'rm -f "$before" "$after"' EXIT
snapshot >"$before"
if ! out=$(tests/setup.sh 2>&1); then
    echo "$out" >&2
    echo "setup-idempotent: FAIL: the second run of tests/setup.sh exited non-zero" >&2
    exit 1
fi
snapshot >"$after"
if ! diff -u "$before" "$after"; then
    echo "setup-idempotent: FAIL: the second run changed the machine (diff above)" >&2
    exit 1
fi
if echo "$out" | grep -qE '^setup: (installing|aligning)'; then
    echo "$out" >&2
    echo "setup-idempotent: FAIL: the second run installed something" >&2
    exit 1
fi
# Negative control: a package that cannot be installed fails the set-up, and
# the message names it.
bogus=imageupd-no-such-package-$$
if out=$(IMAGEUPD_SETUP_EXTRA=$bogus tests/setup.sh debian 2>&1); then
    echo "$out" >&2
    echo "setup-idempotent: FAIL: a set-up with an uninstallable package exited 0" >&2
    exit 1
fi
if ! echo "$out" | grep -q "cannot install package '$bogus'"; then
    echo "$out" >&2
    echo "setup-idempotent: FAIL: the failure message does not name the package" >&2
    exit 1
fi
echo "setup-idempotent: an uninstallable package fails the set-up by name: $(echo "$out" | grep -m1 "cannot install package")"
echo "setup-idempotent: second run of tests/setup.sh changed nothing ($(wc -l <"$before") packages and stamps compared)"
