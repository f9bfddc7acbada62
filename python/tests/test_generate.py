"""python -m kvrt.generate on the tiny random Gemma 3 (byte tokenizer, no download; skipped
without torch/transformers): kvrt in exact mode writes the full cache's text, in one prompt
forward and in chunks, and the report names what ran."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from kvrt import generate  # noqa: E402


def _run(capsys, tmp_path, *extra):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("kvrt keeps the sinks and a recent window on the GPU; " * 8)
    rc = generate.main(["--model", "tiny-random", "--prompt-file", str(prompt), "--new-tokens",
                        "6", "--threads", "2", "--quiet", *extra])
    assert rc == 0
    out = capsys.readouterr()
    return out.out, out.err


def test_exact_kvrt_writes_the_full_caches_text_in_one_forward_and_in_chunks(capsys, tmp_path):
    full, full_err = _run(capsys, tmp_path, "--full")
    assert "full cache (transformers DynamicCache)" in full_err
    kvrt_opts = ("--index", "exact", "--sinks", "4", "--window", "16")
    one, one_err = _run(capsys, tmp_path, *kvrt_opts)
    chunked, chunked_err = _run(capsys, tmp_path, *kvrt_opts, "--prefill-chunk", "100")
    assert one == full and chunked == full
    for err in (one_err, chunked_err):
        assert re.search(r"prompt 4\d\d tokens, generated 6;", err) and "kvrt stats" in err
    # 2 global layers x 5 decode forwards after the prompt, in both runs.
    assert "attend_calls=10" in one_err and "attend_calls=10" in chunked_err


def test_kvrt_fields_pass_through_and_bad_ones_are_refused(capsys, tmp_path):
    # Any kvrt.Config field by name (here ones without a flag of their own); the runtime's repr
    # in the report shows them in effect.
    _, err = _run(capsys, tmp_path, "--index", "exact", "--kvrt", "hot_cache_fraction=0.25",
                  "--kvrt", "cluster_miss_penalty=2")
    assert "kvrt options: hot_cache_fraction=0.25, cluster_miss_penalty=2.0" in err
    with pytest.raises(SystemExit):
        generate.parse_args(["--model", "m", "--prompt-file", "p", "--kvrt", "no_equals_sign"])
    prompt = tmp_path / "prompt.txt"
    for field in ("no_such_field=1", "cluster_miss_penalty=-1", "top_k=abc"):
        rc = generate.main(["--model", "tiny-random", "--prompt-file", str(prompt), "--quiet",
                            "--kvrt", field])
        assert rc == 2, field
        err = capsys.readouterr().err
        assert "python -m kvrt.generate: error:" in err and field.split("=")[0] in err, err


@pytest.mark.parametrize("flag, value", [("--max-prompt-tokens", "-1"), ("--new-tokens", "-3"),
                                         ("--new-tokens", "0"), ("--window", "0")])
def test_counts_below_their_minimum_are_refused(capsys, flag, value):
    # --max-prompt-tokens -1 used to drop the prompt's first token (ids[:, 1:]).
    with pytest.raises(SystemExit):
        generate.parse_args(["--model", "m", "--prompt-file", "p", flag, value])
    assert f"{value} must be >= " in capsys.readouterr().err


def test_a_bad_kvrt_option_is_a_usage_error_not_a_traceback(capsys, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("kvrt")
    rc = generate.main(["--model", "tiny-random", "--prompt-file", str(prompt), "--quiet",
                        "--index", "bogus"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "python -m kvrt.generate: error:" in err and "unknown index kind 'bogus'" in err
    assert "Traceback" not in err


def test_a_chunked_prompts_first_decode_step_is_reported_apart(capsys, tmp_path):
    # kvrt takes a chunked prompt at the first decode step: that step is not a decode rate's.
    _, err = _run(capsys, tmp_path, "--index", "exact", "--window", "16", "--prefill-chunk", "64")
    assert "first decode step" in err and "kvrt's prefill of the chunked prompt" in err
    _, err = _run(capsys, tmp_path, "--index", "exact", "--window", "16")
    assert "first decode step" not in err


def test_bad_paths_and_devices_are_usage_errors_before_the_model_loads(capsys, tmp_path):
    # They were tracebacks (FileNotFoundError, IsADirectoryError, torch's RuntimeError) with exit
    # code 1, the prompt read only after the model had loaded.
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("kvrt")
    for args, said in [(["--prompt-file", str(tmp_path / "none.txt")], "does not exist"),
                       (["--prompt-file", str(tmp_path)], "is not a file"),
                       (["--prompt-file", str(prompt), "--device", "foo"], "expected cpu, cuda"),
                       (["--prompt-file", str(prompt), "--model", str(tmp_path / "no_model")],
                        "not a model folder")]:
        argv = ["--model", "tiny-random", *args]
        with pytest.raises(SystemExit) as e:
            generate.main(argv)
        assert e.value.code == 2, args
        assert said in capsys.readouterr().err, args


def test_the_prompt_as_text_from_a_file_or_from_standard_input_gives_the_same(capsys, tmp_path,
                                                                              monkeypatch):
    # --prompt TEXT and --prompt-file - (0.3.37); only --prompt-file PATH was taken before.
    import io
    text = "kvrt keeps the sinks and a recent window on the GPU; " * 8
    from_file, _ = _run(capsys, tmp_path, "--index", "exact")
    common = ["--model", "tiny-random", "--new-tokens", "6", "--threads", "2", "--quiet",
              "--index", "exact"]
    assert generate.main([*common, "--prompt", text]) == 0
    assert capsys.readouterr().out == from_file
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert generate.main([*common, "--prompt-file", "-"]) == 0
    assert capsys.readouterr().out == from_file
    for argv, said in [(["--prompt", "a", "--prompt-file", "p"], "not allowed with"),
                       ([], "one of the arguments --prompt --prompt-file is required"),
                       (["--prompt", ""], "--prompt: empty")]:
        with pytest.raises(SystemExit) as e:
            generate.parse_args(["--model", "m", *argv])
        assert e.value.code == 2, argv
        assert said in capsys.readouterr().err, argv
