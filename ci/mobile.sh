#!/usr/bin/env bash
# Mobile and cross builds (issue 7), called by ci/test:
#   1. the runtime + C API as static libraries for Android (aarch64-linux-android) and iOS
#      (aarch64-apple-ios): no linker needed for a static library;
#   2. the runtime's unit tests for aarch64-unknown-linux-gnu, run under qemu-aarch64
#      (runner and linker in .cargo/config.toml);
#   3. the C example (examples/c/main.c) is built and run by `cargo test -p meo-ffi`
#      (runtime/ffi/tests/c_example.rs), not here.
# A missing target or tool fails loudly with the reason; it never passes silently.
set -euo pipefail
cd "$(dirname "$0")/.."

die() {
  printf '\n*** ci/mobile.sh: %s\n\n' "$*" >&2
  exit 1
}
timed() {
  local name=$1 t0
  shift
  t0=$(date +%s)
  "$@"
  printf '=== mobile: %s in %ds\n' "$name" $(($(date +%s) - t0)) >&2
}

installed=$(rustup target list --installed)
for t in aarch64-linux-android aarch64-apple-ios aarch64-unknown-linux-gnu; do
  grep -qx "$t" <<<"$installed" ||
    die "rust target $t is not installed (ci/setup could not add it: was the download refused?)"
done
command -v aarch64-linux-gnu-gcc >/dev/null || die "aarch64-linux-gnu-gcc missing (Debian gcc-aarch64-linux-gnu)"
command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 missing (Debian qemu-user)"

for t in aarch64-linux-android aarch64-apple-ios; do
  # `cargo rustc --crate-type staticlib`: only the static library (the cdylib needs the NDK
  # or Xcode linker). It contains the runtime and all its dependencies.
  timed "staticlib $t" cargo rustc -p meo-ffi --lib --release --target "$t" --crate-type staticlib
  lib=${CARGO_TARGET_DIR:-target}/$t/release/libmeo_ffi.a
  [[ -s $lib ]] || die "$lib was not produced"
  printf '=== mobile: %s %s bytes\n' "$lib" "$(stat -c %s "$lib")" >&2
done

# Three tests need the host kernel and are run natively in ci/test's test step instead: the
# SIGBUS guard's tests re-execute the test binary in a child process (qemu-user cannot exec an
# aarch64 binary without binfmt_misc: exit 127), and the read-ahead test counts page-cache pages
# with mincore after madvise, which qemu-user's emulated mappings do not report as the kernel does.
printf '=== mobile: under qemu, not run here (run natively in the test step): %s\n' \
  "guard::tests::*, residency::tests::a_rejected_header_advises_nothing" >&2
timed "aarch64 unit tests under qemu" cargo test -p meo-runtime --lib --target aarch64-unknown-linux-gnu -- \
  --skip guard::tests:: --skip residency::tests::a_rejected_header_advises_nothing
