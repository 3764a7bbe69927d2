#!/bin/bash
# The main job, end to end, on data this script makes itself:
#   build two real Debian roots (v1 = debootstrap minbase, v2 = v1 plus
#   packages and an edited config; cached by tests/fixtures/build-trees.sh),
#   publish both into a signed store, plan v1 -> v2, apply it in place onto a
#   scratch root (a copy of v1), verify with checksums, and show status.
#
#   sudo tests/demo.sh            (work dir: /var/tmp/imageupd-demo)
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DEMO_DIR:-/var/tmp/imageupd-demo}
CACHE=${IMAGEUPD_TEST_CACHE:-/var/cache/imageupd-test}
[ "$(id -u)" = 0 ] || { echo "demo.sh must run as root (it creates device nodes and owns files as other users)" >&2; exit 1; }

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "set-up: packages and fixture trees (tests/setup.sh; nothing is installed twice)"
"$REPO/tests/setup.sh"

say "building imageupd (release)"
(cd "$REPO" && cargo build --release -q -p imageupd)
BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/imageupd

say "the data: Debian bookworm roots v1 and v2 (built by the set-up, cached in $CACHE)"

rm -rf "$WORK"
mkdir -p "$WORK"
say "keygen"
"$BIN" keygen --out "$WORK/signing.key"

say "publish v1 and v2 into a signed, content-addressed store"
"$BIN" publish --store "$WORK/store" --id v1 --key "$WORK/signing.key" "$CACHE/v1"
"$BIN" publish --store "$WORK/store" --id v2 --parent v1 --key "$WORK/signing.key" "$CACHE/v2"
du -sh "$WORK/store"

say "a node running v1 (a scratch copy), trusting the key"
cp -a "$CACHE/v1" "$WORK/root"
mkdir -p "$WORK/root/etc/imageupd/trusted.d"
cp "$WORK/signing.key.pub" "$WORK/root/etc/imageupd/trusted.d/"
"$BIN" apply --from "$WORK/store" --id v1 --root "$WORK/root"

say "plan v1 -> v2 (changes nothing)"
"$BIN" plan --from "$WORK/store" --id v2 --root "$WORK/root"

say "apply v2 in place"
"$BIN" apply --from "$WORK/store" --id v2 --root "$WORK/root"

say "verify --checksum (independent of the apply's own bookkeeping)"
"$BIN" verify --root "$WORK/root" --checksum

say "status"
"$BIN" status --root "$WORK/root"

say "apply v2 again: nothing to do"
"$BIN" apply --from "$WORK/store" --id v2 --root "$WORK/root"
