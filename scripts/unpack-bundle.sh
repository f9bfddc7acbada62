#!/usr/bin/env bash
# unpack-bundle.sh: on the device machine, unpacks the carried .bundlez/bundle.t[gx]z into .bundle/
# (run from the repository root by the device scripts' --device modes). A warm device machine
# keeps the last call's .bundle (ignored files stay), so it unpacks again whenever the carried
# archive differs from the one .bundle came from.
set -euo pipefail
cd "$(dirname "$0")/.."
# The archive: bundle.txz (xz, what device-check.sh packs where xz is installed: a third the
# size, and the carry holds 64 MiB with the tree) or bundle.tgz. Without xz there, python3's lzma.
arch=.bundlez/bundle.tgz
[[ -f .bundlez/bundle.txz ]] && arch=.bundlez/bundle.txz
sum=$(cksum < "$arch")
if [[ ! -d .bundle/bin || "$(cat .bundle/.archive-sum 2>/dev/null)" != "$sum" ]]; then
  rm -rf .bundle
  if [[ $arch == *.tgz ]]; then
    tar xzf "$arch"
  elif command -v xz > /dev/null; then
    tar xJf "$arch"
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall()' "$arch"
  fi
  echo "$sum" > .bundle/.archive-sum
fi
