#!/usr/bin/env bash
# unpack-bundle.sh: on the device machine, unpacks the carried .bundlez/bundle.tgz into .bundle/
# (run from the repository root by the device scripts' --device modes). A warm device machine
# keeps the last call's .bundle (ignored files stay), so it unpacks again whenever the carried
# archive differs from the one .bundle came from.
set -euo pipefail
cd "$(dirname "$0")/.."
sum=$(cksum < .bundlez/bundle.tgz)
if [[ ! -d .bundle/bin || "$(cat .bundle/.archive-sum 2>/dev/null)" != "$sum" ]]; then
  rm -rf .bundle
  tar xzf .bundlez/bundle.tgz
  echo "$sum" > .bundle/.archive-sum
fi
