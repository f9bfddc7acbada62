"""tools/gpu_bench/sass_summary.py (ncu's per-SASS-instruction counters summed by opcode) on a
synthetic `ncu --page source --print-source sass --csv` table."""

from __future__ import annotations

import gzip

import pytest


HEADER = ('"Address","Source","Warp Stall Sampling (All Samples)",'
          '"Warp Stall Sampling (Not-issued Samples)","Instructions Executed",'
          '"stall_long_sb","stall_math","stall_long_sb (Not Issued)"')


def _row(addr, source, stalls, inst, long_sb, math):
    return f'"{addr}","{source}","{stalls}","0","{inst}","{long_sb}","{math}","0"'


def test_sums_by_opcode_and_lists_the_stalls(tmp_path, capsys, gpu_bench_tool):
    # The program's own output before the table (gtest lines) is skipped; modifiers and
    # predicates do not split an opcode.
    lines = ["Running main() from gtest_main.cc", "[ RUN      ] CodeRest.TimesThe128KShape", HEADER,
             _row("0x7f00", "      HMMA.16816.F32 R4, R8, R12, R4", 10, 400, 2, 8),
             _row("0x7f10", "      PRMT R77, R60, R6, RZ", 90, 100, 88, 2),
             _row("0x7f20", "@!P0  HMMA.16816.F32 R4, R8, R14, R4", 5, 100, 0, 5),
             _row("0x7f30", "      LOP3.LUT R5, R60, 0xffff0000, RZ, 0xc0, !PT", 0, 400, 0, 0)]
    path = tmp_path / "sass.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(lines) + "\n")
    assert gpu_bench_tool("sass_summary").main([str(path), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "4 SASS instructions, 1000 warp instructions executed, 105 stall samples" in out
    by_op = {line.split()[0]: line.split() for line in out.splitlines()
             if line.split() and line.split()[0] in ("HMMA", "PRMT", "LOP3")}
    assert by_op["HMMA"][1:5] == ["500", "50.0%", "15", "14.3%"]
    assert by_op["PRMT"][1:5] == ["100", "10.0%", "90", "85.7%"]
    assert by_op["LOP3"][1:3] == ["400", "40.0%"]
    # The two instructions with the most stall samples, each with its main reason.
    top = out.split("stall samples:")[1].strip().splitlines()
    assert len(top) == 2
    assert "long_sb 88" in top[0] and "PRMT R77" in top[0]
    assert "math 8" in top[1] and "HMMA" in top[1]


def test_a_file_without_the_table_is_refused(tmp_path, gpu_bench_tool):
    path = tmp_path / "log.txt"
    path.write_text("==PROF== Disconnected\n")
    with pytest.raises(SystemExit) as e:
        gpu_bench_tool("sass_summary").main([str(path)])
    assert "no ncu source table" in str(e.value)
