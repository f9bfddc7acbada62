#!/bin/sh
# check_exports.sh LIBKVRT_SO KVRT_H: the shared library's dynamic symbol table defines exactly the
# functions kvrt.h declares with KVRT_API: nothing linked into it (faiss, Abseil, TBB, CUDA, the
# C++ modules) is exported (api/kvrt.map), and no API function is missing.
set -eu
exported=$(nm -D --defined-only "$1" | awk '{print $NF}' | sort)
# Besides the header's functions: kvrt_config_default as 0.2 exported it (api/src/compat_0_2.cc;
# the header makes it an inline since 0.3).
declared=$({ grep -o '^KVRT_API [^(]*(' "$2" | sed -E 's/.*[ *](kvrt_[A-Za-z0-9_]*)\($/\1/'; echo kvrt_config_default; } | sort)
if [ "$exported" != "$declared" ]; then
  echo "exported but not declared:"
  printf '%s\n' "$exported" | grep -vxF "$declared" | head -20 || true
  echo "declared but not exported:"
  printf '%s\n' "$declared" | grep -vxF "$exported" || true
  exit 1
fi
echo "$(printf '%s\n' "$exported" | wc -l) symbols exported, all kvrt_* API functions"
