#!/usr/bin/env python3
"""How fast host memory becomes readable by the GPU: cudaHostRegister (what kvrt's direct step
does to its host stores) of ordinary 4 KiB pages and of transparent huge pages, and
cudaHostAlloc (pinned allocation), in GB/s, on the machine this runs on.

Each case takes --gib GiB of anonymous memory, touched first (as a filled store is) unless said,
registers it as kvrt does (mapped, read-only where supported) in chunks of --chunk-mib MiB, and
unregisters it. The kernel's transparent-huge-page mode is printed: madvise(MADV_HUGEPAGE) only
takes effect under "always" or "madvise".

  python3 tools/gpu_bench/host_register.py --gib 2
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
import time


def thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="memory per case, GiB")
    ap.add_argument("--chunk-mib", type=int, default=64, help="bytes per cudaHostRegister call")
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("host_register: no CUDA device", file=sys.stderr)
        return 2
    torch.cuda.init()
    rt = torch.cuda.cudart()
    size = int(args.gib * (1 << 30)) // (2 << 20) * (2 << 20)
    chunk = args.chunk_mib << 20
    mapped_ro = 0x02 | 0x08  # cudaHostRegisterMapped | cudaHostRegisterReadOnly
    print(f"transparent huge pages: {thp_mode()}; {size / (1 << 30):.2f} GiB per case, "
          f"{args.chunk_mib} MiB per call")

    def register_case(name: str, huge: bool, touch: bool) -> None:
        m = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        start = (base + (2 << 20) - 1) // (2 << 20) * (2 << 20)  # 2 MiB aligned
        if huge:
            m.madvise(mmap.MADV_HUGEPAGE)
        t0 = time.perf_counter()
        if touch:
            ctypes.memset(start, 1, size)
        t1 = time.perf_counter()
        done = 0
        for at in range(0, size, chunk):
            n = min(chunk, size - at)
            err = rt.cudaHostRegister(start + at, n, mapped_ro)
            if int(err) != 0:
                print(f"  {name}: cudaHostRegister failed ({err})")
                break
            done = at + n
        t2 = time.perf_counter()
        for at in range(0, done, chunk):
            rt.cudaHostUnregister(start + at)
        t3 = time.perf_counter()
        gbs = done / max(t2 - t1, 1e-9) / 1e9
        print(f"  {name:34s} register {t2 - t1:7.3f} s = {gbs:6.2f} GB/s"
              + (f"  (touch {t1 - t0:.3f} s)" if touch else "") + f", unregister {t3 - t2:.3f} s")
        del m

    register_case("4 KiB pages, touched", huge=False, touch=True)
    register_case("transparent huge pages, touched", huge=True, touch=True)
    register_case("4 KiB pages, untouched", huge=False, touch=False)
    register_case("transparent huge pages, untouched", huge=True, touch=False)
    t0 = time.perf_counter()
    x = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    t1 = time.perf_counter()
    print(f"  {'cudaHostAlloc (torch pin_memory)':34s} alloc    {t1 - t0:7.3f} s = "
          f"{size / (t1 - t0) / 1e9:6.2f} GB/s")
    del x
    return 0


if __name__ == "__main__":
    sys.exit(main())
