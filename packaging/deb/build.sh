#!/bin/bash
# Build the imageupd Debian package with dpkg-deb (no debhelper, no
# network): one command, run from anywhere in the repository.
#
#   packaging/deb/build.sh [--binary PATH] [--out DIR] [--version V]
#
#   --binary PATH  package this prebuilt binary (CI packages the debug build
#                  it already has); default: `cargo build --release` and
#                  target/release/imageupd
#   --out DIR      where the .deb goes (default target/deb)
#   --version V    package version (default: the crate's version)
#
# Prints the path of the .deb on stdout. Contents (see README "Debian
# package"): /usr/bin/imageupd; the units in /usr/lib/systemd/system; the
# os-refresh-config steps in /usr/libexec/os-refresh-config/; the ready
# hooks in /usr/share/imageupd/hooks/ (not enabled); the commented default
# /etc/imageupd/config.toml (a conffile) and empty config.d/, trusted.d/,
# hooks/ directories; /var/lib/imageupd; man pages and bash/zsh/fish
# completions generated from the binary (`imageupd generate-docs`).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/packaging/deb
binary= out=$repo/target/deb version=
while [ $# -gt 0 ]; do
    case $1 in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --version) version=$2; shift 2 ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$version" ]; then
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/agent/Cargo.toml" | head -1)
fi
if [ -z "$binary" ]; then
    (cd "$repo" && cargo build --release --locked -p imageupd) >&2
    binary=$repo/target/release/imageupd
fi
[ -x "$binary" ] || { echo "build.sh: $binary is not an executable" >&2; exit 1; }
arch=$(dpkg --print-architecture)

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
root=$stage/root
install -d "$root/DEBIAN"
install -D -m 0755 "$binary" "$root/usr/bin/imageupd"
# Debug info stays with the build; the package carries a stripped binary.
strip --strip-debug "$root/usr/bin/imageupd"

for u in "$repo"/systemd/*.service; do
    install -D -m 0644 "$u" "$root/usr/lib/systemd/system/$(basename "$u")"
done
for phase in pre-configure.d configure.d; do
    for s in "$repo/os-refresh-config/$phase"/*; do
        install -D -m 0755 "$s" "$root/usr/libexec/os-refresh-config/$phase/$(basename "$s")"
    done
done
install -d "$root/usr/share/imageupd"
cp -a "$repo/hooks" "$root/usr/share/imageupd/hooks"

install -D -m 0644 "$here/config.toml" "$root/etc/imageupd/config.toml"
install -d -m 0755 "$root/etc/imageupd/config.d" "$root/etc/imageupd/trusted.d" \
    "$root/etc/imageupd/hooks" "$root/var/lib/imageupd"

docs=$stage/docs
"$root/usr/bin/imageupd" generate-docs "$docs" >/dev/null
install -d "$root/usr/share/man/man1"
for m in "$docs"/man1/*.1; do
    gzip -9n <"$m" >"$root/usr/share/man/man1/$(basename "$m").gz"
done
install -D -m 0644 "$docs/completions/imageupd.bash" "$root/usr/share/bash-completion/completions/imageupd"
install -D -m 0644 "$docs/completions/_imageupd" "$root/usr/share/zsh/vendor-completions/_imageupd"
install -D -m 0644 "$docs/completions/imageupd.fish" "$root/usr/share/fish/vendor_completions.d/imageupd.fish"

doc=$root/usr/share/doc/imageupd
install -d "$doc"
for f in README.md docs/agent.md docs/fleet.md docs/kernel.md docs/metrics.md; do
    gzip -9n <"$repo/$f" >"$doc/$(basename "$f").gz"
done
cat >"$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: imageupd

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPYRIGHT

# Dependencies of the binary, as dpkg-shlibdeps finds them (it wants a
# debian/control to read; give it a minimal one).
shl=$stage/shlibs
install -d "$shl/debian"
printf 'Source: imageupd\n\nPackage: imageupd\nArchitecture: any\n' >"$shl/debian/control"
depends=$(cd "$shl" && dpkg-shlibdeps -O "$root/usr/bin/imageupd" 2>"$stage/shlibdeps.err" |
    sed -n 's/^shlibs:Depends=//p') || {
    cat "$stage/shlibdeps.err" >&2
    echo "build.sh: dpkg-shlibdeps failed" >&2
    exit 1
}
[ -n "$depends" ] || { cat "$stage/shlibdeps.err" >&2; echo "build.sh: no dependencies found" >&2; exit 1; }

size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat >"$root/DEBIAN/control" <<CONTROL
Package: imageupd
Version: $version
Architecture: $arch
Maintainer: imageupd developers <imageupd@localhost>
Section: admin
Priority: optional
Installed-Size: $size
Depends: $depends
Recommends: kexec-tools
Suggests: os-refresh-config, prometheus-node-exporter
Description: in-place golden-image updates for deployed Linux nodes
 imageupd moves a node's root filesystem to a new signed golden image in
 place: only changed files are fetched and staged, services are quiesced by
 hooks only for the atomic swap, and the node reboots only when the kernel
 changed. It also publishes and serves the signed, content-addressed image
 store, and coordinates fleet rollouts through etcd.
 .
 The package installs the agent's systemd unit (not enabled), the
 os-refresh-config steps and ready-made hooks (not enabled; see
 /usr/share/imageupd/hooks/README.md).
CONTROL
echo /etc/imageupd/config.toml >"$root/DEBIAN/conffiles"
install -m 0755 "$here/postinst" "$here/postrm" "$root/DEBIAN/"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -print0 | sort -z |
    xargs -0 md5sum | sed 's| \./| |') >"$root/DEBIAN/md5sums"

mkdir -p "$out"
deb=$out/imageupd_${version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >&2
echo "$deb"
