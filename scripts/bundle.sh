#!/usr/bin/env bash
# bundle.sh OUT PROGRAM...: makes programs built here runnable on the GPU machine (same libc, no
# FAISS/TBB/Abseil/OpenBLAS there). Copies each program to OUT/bin and the shared libraries it
# loads to OUT/lib, leaving out what every Linux machine and the GPU driver provide. Run there as
#   LD_LIBRARY_PATH=OUT/lib OUT/bin/PROGRAM ...
# OUT belongs in an ignored folder that the device call carries (64 MiB in all).
# bundle.sh --deps-only OUT FILE...: only the shared libraries that FILE (a program or a shared
# library, e.g. an installed libkvrt.so) loads go to OUT/lib; FILE itself is not copied.
set -euo pipefail
deps_only=0
[ "${1:-}" = "--deps-only" ] && { deps_only=1; shift; }
[ $# -ge 2 ] || { echo "usage: $0 [--deps-only] OUT PROGRAM..." >&2; exit 2; }
out=$1
shift
mkdir -p "$out/bin" "$out/lib"
system='^(linux-vdso|ld-linux|libc\.so|libm\.so|libdl\.so|libpthread\.so|librt\.so|libstdc\+\+\.so|libgcc_s\.so|libcuda\.so|libnvidia)'
for prog in "$@"; do
  if [ $deps_only = 1 ]; then
    [ -f "$prog" ] || { echo "bundle: $prog is not a file" >&2; exit 2; }
  else
    [ -x "$prog" ] || { echo "bundle: $prog is not an executable" >&2; exit 2; }
    cp -L "$prog" "$out/bin/"
  fi
  while read -r lib path; do
    [[ $lib =~ $system ]] && continue
    [ "$path" != "not" ] || { echo "bundle: $prog needs $lib, which is not installed here" >&2; exit 1; }
    [ -f "$path" ] && cp -L "$path" "$out/lib/$lib"
  done < <(ldd "$prog" | awk '/=>/ {print $1, $3}')
done
strip --strip-unneeded "$out"/bin/* "$out"/lib/* 2>/dev/null || true
echo "bundle: $(du -sh "$out" | cut -f1) in $out"
