#!/usr/bin/env python3
"""Writes the committed seed corpus of fuzz_trace and fuzz_api (small, deterministic).

Trace seeds are tiny valid traces (the fuzzer mutates from there into the interesting failures)
plus a few classic hostile headers; api seeds are short programs for fuzz_api's decoder.
"""
import json, os, struct

here = os.path.dirname(os.path.abspath(__file__))

def trace(layers=1, q=2, kv=1, d=2, dtype="f32", prompt=3, steps=1, extra=None, tamper=None):
    st, es = {"f32": ("F32", 4), "f16": ("F16", 2), "bf16": ("BF16", 2)}[dtype]
    md = {"format": "kvrt-trace", "format_version": "1", "model": "seed", "num_layers": str(layers),
          "num_q_heads": str(q), "num_kv_heads": str(kv), "head_dim": str(d), "dtype": dtype,
          "prompt_tokens": str(prompt), "decode_steps": str(steps), "scale": "0",
          "post_rotary": "true"}
    md.update(extra or {})
    header, off, data = {"__metadata__": md}, 0, b""
    for l in range(layers):
        for part in ["prefill.q", "prefill.k", "prefill.v", "decode.q", "decode.k", "decode.v"]:
            rows = prompt if part.startswith("prefill") else steps
            heads = q if part.endswith("q") else kv
            n = rows * heads * d * es
            header[f"{l}.{part}"] = {"dtype": st, "shape": [rows, heads, d], "data_offsets": [off, off + n]}
            data += bytes((off + i) % 251 for i in range(n))
            off += n
    if tamper: tamper(header)
    h = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h)) + h + data

def write(sub, name, blob):
    os.makedirs(os.path.join(here, "corpus", sub), exist_ok=True)
    with open(os.path.join(here, "corpus", sub, name), "wb") as f: f.write(blob)

write("trace", "valid_f32", trace())
write("trace", "valid_bf16_2layers", trace(layers=2, q=4, kv=2, d=2, dtype="bf16", prompt=2, steps=2))
write("trace", "valid_f16_empty_decode", trace(dtype="f16", steps=0, extra={"seed": "7"}))
write("trace", "truncated", trace()[:-5])
write("trace", "huge_header_len", struct.pack("<Q", 1 << 60) + b"{}")
def big(h): h["0.prefill.k"]["shape"] = [1 << 40, 1, 2]
write("trace", "shape_beyond_file", trace(tamper=big))
def overlap(h): h["0.prefill.v"]["data_offsets"] = h["0.prefill.k"]["data_offsets"]
write("trace", "overlap", trace(tamper=overlap))

# fuzz_api programs: mode byte, config bytes, then ops (see fuzz_api.cc).
# config: layers kv group d dtype scale sinks window topk kind record check limits amp seed*4
cfg_exact = bytes([0, 1, 1, 1, 3, 0, 1, 1, 2, 3, 0, 1, 1, 0, 0, 1, 2, 3, 4])
ops = bytes([0,                    # create
             2, 0, 0, 9, 1,        # prefill seq0 layer0 10 tokens with q
             5, 0, 0, 0,           # attend
             7, 0, 0, 0, 60,       # get_attended
             4, 0, 0, 0, 0,        # append 1
             6, 0, 0, 0,           # attend
             8, 1, 0, 5, 0, 0, 0, 8, 9])
write("api", "exact_prefill_attend", b"\x00" + cfg_exact + ops)
cfg_flat = bytes([1, 2, 2, 4, 2, 0, 2, 3, 4, 4, 1, 1, 3, 1, 9, 9, 9, 9])
write("api", "flat_bf16_limits", b"\x01" + cfg_flat + ops + bytes([0, 3, 1, 1, 15, 0, 5, 1, 1, 0, 1, 1, 8]))
write("api", "create_only", b"\xf5" + bytes(range(1, 64)))
