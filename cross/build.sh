#!/bin/sh
# Cross-builds static, stripped sockproxyd binaries into dist/.
#
#   cross/build.sh [--setup-only] [target ...]
#
# Default targets: the router (mipsel) first, then the openLuup hosts. Installs its own
# tools on a fresh machine: the pinned nightly with rust-src (rustup), zig and
# cargo-zigbuild (pip). See cross/README.md for why each flag is here.
set -eu

# Pinned: the versions this recipe was verified with (cross/README.md).
NIGHTLY="${NIGHTLY:-nightly-2026-10-29}"
ZIGLANG_VERSION="${ZIGLANG_VERSION:-0.17.1}"
CARGO_ZIGBUILD_VERSION="${CARGO_ZIGBUILD_VERSION:-0.24.1}"
DEFAULT_TARGETS="mipsel-unknown-linux-musl armv7-unknown-linux-musleabihf aarch64-unknown-linux-musl x86_64-unknown-linux-musl"

cd "$(dirname "$0")/.."
DIST="${DIST:-dist}"

setup() {
    if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
        rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src,llvm-tools
    fi
    # rust-src: std is rebuilt for each target; llvm-tools: llvm-objcopy below.
    rustup component add rust-src llvm-tools --toolchain "$NIGHTLY" 2>/dev/null
    # pip puts cargo-zigbuild in the interpreter's scripts folder, which a fresh
    # machine may not have on PATH (pyenv shims, ~/.local/bin).
    PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$HOME/.local/bin:$PATH"
    export PATH
    if ! command -v cargo-zigbuild >/dev/null 2>&1 || ! python3 -c 'import ziglang' 2>/dev/null; then
        python3 -m pip install --quiet "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"
    fi
}

# Flags common to every target: the smallest std (built from source with
# optimize_for_size), panics that abort without unwinding or message machinery,
# hence no unwind tables (-60 KiB on mipsel), no file/line strings for panic
# locations. zig supplies musl's start files and libc (rustc's self-contained
# copies are not there when std is built from source).
common_flags="-Zunstable-options -Cpanic=immediate-abort -Zlocation-detail=none -Cforce-unwind-tables=no -Clink-self-contained=no"

build() {
    target="$1"
    flags="$common_flags"
    case "$target" in
        # A static-PIE mipsel binary crashed at startup under qemu; a plain static
        # executable works (and is what a router's busybox expects anyway).
        mipsel-*) flags="$flags -C relocation-model=static" ;;
    esac
    echo "== $target"
    RUSTFLAGS="$flags" cargo +"$NIGHTLY" zigbuild --release --target "$target" \
        -Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size
    mkdir -p "$DIST"
    # Sections nothing reads at run time: MIPS procedure descriptors (.pdr, ~100 KiB
    # that strip leaves in place) and the compiler's version comment.
    objcopy="$(rustc +"$NIGHTLY" --print sysroot)/lib/rustlib/$(rustc +"$NIGHTLY" -vV | sed -n 's/^host: //p')/bin/llvm-objcopy"
    "$objcopy" --remove-section=.pdr --remove-section=.comment \
        "target/$target/release/sockproxyd" "$DIST/sockproxyd-$target"
    ls -l "$DIST/sockproxyd-$target"
}

setup_only=false
if [ "${1:-}" = "--setup-only" ]; then
    setup_only=true
    shift
fi
setup
"$setup_only" && exit 0
# shellcheck disable=SC2086 # a list of words, split on purpose
[ "$#" -gt 0 ] || set -- $DEFAULT_TARGETS
for t in "$@"; do
    build "$t"
done
