#!/bin/sh
# Builds Debian packages of sockproxyd from the static cross builds in dist/.
#
#   deb/build.sh [target ...]      (make deb: all three)
#
# One package per target: x86_64-unknown-linux-musl -> amd64,
# aarch64-unknown-linux-musl -> arm64, armv7-unknown-linux-musleabihf -> armhf,
# each from dist/sockproxyd-<target> (make cross), into dist/deb/. Only
# dpkg-deb is needed: the tree is laid out here by hand (deb/README.md says what
# goes where and why). Reproducible: every date is the commit's
# (SOURCE_DATE_EPOCH), every owner root.
#
# Settings (environment): DIST (dist), DEB_VERSION (Cargo.toml's version),
# DEB_MAINTAINER ("name <email>"; default: the last commit's author),
# SOURCE_DATE_EPOCH (default: the last commit's date).
set -eu

cd "$(dirname "$0")/.."
DIST="${DIST:-dist}"
OUT="$DIST/deb"
STAGE="${STAGE:-target/deb}"
DEFAULT_TARGETS="x86_64-unknown-linux-musl aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf"

die() {
	echo "deb/build.sh: $*" >&2
	exit 1
}

command -v dpkg-deb >/dev/null 2>&1 || die "dpkg-deb not found (apt-get install dpkg-dev)"

: "${DEB_VERSION:=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)}"
[ -n "$DEB_VERSION" ] || die "no version in Cargo.toml"
if [ -z "${DEB_MAINTAINER:-}" ]; then
	DEB_MAINTAINER=$(git log -1 --format='%an <%ae>' 2>/dev/null) ||
		die "no git history: set DEB_MAINTAINER=\"name <email>\""
fi
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
	SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null) || SOURCE_DATE_EPOCH=0
fi
export SOURCE_DATE_EPOCH
commit=$(git rev-parse --short HEAD 2>/dev/null) || commit=unknown

arch_of() {
	case "$1" in
	x86_64-*-linux-musl) echo amd64 ;;
	aarch64-*-linux-musl) echo arm64 ;;
	# Debian's armhf baseline is ARMv7 with VFPv3-D16: the armv7 build.
	armv7-*-linux-musleabihf) echo armhf ;;
	*) die "no Debian architecture for target $1" ;;
	esac
}

# Installs $1 as $3 (relative to the package root $ROOT) with mode $2.
put() {
	mkdir -p "$ROOT/$(dirname "$3")"
	cp "$1" "$ROOT/$3"
	chmod "$2" "$ROOT/$3"
}

# Like put, compressed the way Debian wants it (no name, no time stamp).
put_gz() {
	mkdir -p "$ROOT/$(dirname "$3")"
	gzip -9n <"$1" >"$ROOT/$3"
	chmod "$2" "$ROOT/$3"
}

build() {
	target="$1"
	arch=$(arch_of "$target")
	bin="$DIST/sockproxyd-$target"
	[ -f "$bin" ] || die "no $bin: run make cross (cross/README.md)"
	ROOT="$STAGE/$arch"
	rm -rf "$ROOT"
	mkdir -p "$ROOT/DEBIAN"
	umask 022

	put "$bin" 755 usr/sbin/sockproxyd
	put sockproxyd.service 644 usr/lib/systemd/system/sockproxyd.service
	put deb/sockproxyd.conf 644 etc/sockproxyd.conf
	put deb/sockproxyd.logrotate 644 etc/logrotate.d/sockproxyd
	put_gz docs/sockproxyd.8 644 usr/share/man/man8/sockproxyd.8.gz
	put deb/copyright 644 usr/share/doc/sockproxyd/copyright
	put_gz docs/PROTOCOL.md 644 usr/share/doc/sockproxyd/PROTOCOL.md.gz
	put deb/lintian-overrides 644 usr/share/lintian/overrides/sockproxyd

	# A native package's changelog: one entry for the version being built.
	date=$(LC_ALL=C date -u -R -d "@$SOURCE_DATE_EPOCH")
	printf '%s\n' \
		"sockproxyd ($DEB_VERSION) unstable; urgency=medium" "" \
		"  * Built with make deb from commit $commit; the project's history is" \
		"    its git log." "" \
		" -- $DEB_MAINTAINER  $date" >"$STAGE/changelog"
	put_gz "$STAGE/changelog" 644 usr/share/doc/sockproxyd/changelog.gz

	for s in postinst prerm postrm; do
		put "deb/$s" 755 "DEBIAN/$s"
	done
	printf '%s\n' /etc/logrotate.d/sockproxyd /etc/sockproxyd.conf >"$ROOT/DEBIAN/conffiles"
	chmod 644 "$ROOT/DEBIAN/conffiles"
	size=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
	{
		printf '%s\n' "Package: sockproxyd" "Version: $DEB_VERSION" "Architecture: $arch" \
			"Maintainer: $DEB_MAINTAINER" "Installed-Size: $size"
		cat deb/control
	} >"$ROOT/DEBIAN/control"
	chmod 644 "$ROOT/DEBIAN/control"
	(cd "$ROOT" && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\./||' |
		LC_ALL=C sort | xargs md5sum) >"$ROOT/DEBIAN/md5sums"
	chmod 644 "$ROOT/DEBIAN/md5sums"

	find "$ROOT" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
	mkdir -p "$OUT"
	deb="$OUT/sockproxyd_${DEB_VERSION}_$arch.deb"
	dpkg-deb --root-owner-group -Zxz --build "$ROOT" "$deb" >/dev/null
	echo "$deb"
}

# shellcheck disable=SC2086 # a list of words, split on purpose
[ "$#" -gt 0 ] || set -- $DEFAULT_TARGETS
for t in "$@"; do
	build "$t"
done
