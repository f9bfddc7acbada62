"""The trace recorder's helpers (tools/record; no torch needed): which layers attend a sliding
window, the --layers grammar, and check_trace.py on files that are not traces."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from conftest import load_tool


def _load(name: str):
    return load_tool("record", name)


def test_a_window_in_the_config_without_layer_types_slides_every_layer():
    # Mistral, Mixtral, Phi-3, Starcoder2: recorded as full attention before, the traces wrong.
    record = _load("record")
    mistral = SimpleNamespace(num_hidden_layers=3, sliding_window=64)
    assert record.layer_types(mistral) == ["sliding_attention"] * 3
    assert record.parse_layers("global", mistral) == ([], [0, 1, 2])
    off = SimpleNamespace(num_hidden_layers=2, sliding_window=64, use_sliding_window=False)
    assert record.layer_types(off) == ["full_attention"] * 2
    llama = SimpleNamespace(num_hidden_layers=2)
    assert record.parse_layers("global", llama) == ([0, 1], [])
    gemma = SimpleNamespace(num_hidden_layers=3, sliding_window=8,
                            layer_types=["sliding_attention", "full_attention", "full_attention"])
    assert record.parse_layers("global", gemma) == ([1, 2], [0])


def test_layer_lists_ranges_and_negative_indices():
    record = _load("record")
    cfg = SimpleNamespace(num_hidden_layers=6)
    assert record.parse_layers("0-2,5", cfg)[0] == [0, 1, 2, 5]
    assert record.parse_layers("-1", cfg)[0] == [5]  # was read as an empty range "" - "1"
    for bad, said in [("1-0", "is empty"), ("abc", "not a layer index"), ("7", "out of range")]:
        with pytest.raises(SystemExit, match=said):
            record.parse_layers(bad, cfg)


def test_check_trace_names_a_file_that_is_not_a_trace(tmp_path):
    pytest.importorskip("numpy")
    check = _load("check_trace")
    text = tmp_path / "notes.txt"
    text.write_text("not a safetensors file at all")
    with pytest.raises(SystemExit, match="not a safetensors file"):
        check.load_trace(str(text))  # was a MemoryError from an absurd header length
    with pytest.raises(SystemExit, match="No such file"):
        check.load_trace(str(tmp_path / "none.safetensors"))
