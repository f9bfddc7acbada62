"""Bad input raises a KvrtError subclass with the library's (or the binding's) message."""

from __future__ import annotations

import numpy as np
import pytest

import kvrt
from conftest import SHAPE, kv


@pytest.fixture
def rt():
    with kvrt.Runtime(**SHAPE, dtype="f32", window_tokens=16) as r:
        yield r


def test_attend_before_prefill_is_failed_precondition(rt):
    seq = rt.sequence()
    with pytest.raises(kvrt.FailedPreconditionError, match="holds no token") as e:
        seq.attend(0, np.zeros((8, 32), np.float32))
    assert e.value.status == 4 and e.value.status_name == "KVRT_ERR_FAILED_PRECONDITION"
    assert isinstance(e.value, kvrt.KvrtError) and isinstance(e.value, RuntimeError)


def test_prefill_twice(rt, rng):
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 3), kv(rng, 3))
    with pytest.raises(kvrt.FailedPreconditionError, match="already holds 3 tokens"):
        seq.prefill(0, None, kv(rng, 3), kv(rng, 3))


def test_unknown_index_kind_lists_the_kinds():
    with pytest.raises(kvrt.InvalidArgumentError, match="unknown index kind 'nope'") as e:
        kvrt.Runtime(index_kind="nope")
    for name in kvrt.index_kinds():
        assert name in str(e.value)
    assert isinstance(e.value, ValueError)


def test_config_out_of_range_names_the_field():
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.num_q_heads"):
        kvrt.Runtime(num_q_heads=6, num_kv_heads=4)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"config\.top_k .*C type"):
        kvrt.Runtime(top_k=2**40)
    with pytest.raises(TypeError, match="unknown kvrt config field"):
        kvrt.Runtime(top_kk=3)


@pytest.mark.parametrize("q, what", [
    (np.zeros((8, 32), np.float64), "dtype float64; expected f32"),
    (np.zeros((8, 16), np.float32), r"shape \(8, 16\); expected \(8, 32\)"),
    (np.zeros((1, 8, 32), np.float32), r"shape \(1, 8, 32\)"),
    (np.zeros((8, 64), np.float32)[:, ::2], "not contiguous"),
    (np.zeros((8, 32), np.int32), "dtype int32"),
])
def test_bad_query(rt, rng, q, what):
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 5), kv(rng, 5))
    with pytest.raises(kvrt.InvalidArgumentError, match=what):
        seq.attend(0, q)


def test_bad_out_and_kv(rt, rng):
    seq = rt.sequence()
    with pytest.raises(kvrt.InvalidArgumentError, match=r"v has shape \(4, 2, 32\); expected \(5"):
        seq.prefill(0, None, kv(rng, 5), kv(rng, 4))
    with pytest.raises(kvrt.InvalidArgumentError, match=r"k has shape \(5, 3, 32\)"):
        seq.append(0, kv(rng, 5, 3), kv(rng, 5, 3))
    seq.prefill(0, None, kv(rng, 5), kv(rng, 5))
    with pytest.raises(kvrt.InvalidArgumentError, match="out has dtype float16"):
        seq.attend(0, np.zeros((8, 32), np.float32), out=np.zeros((8, 32), np.float16))
    with pytest.raises(TypeError, match="out is read-only"):  # was a signature dump
        ro = np.zeros((8, 32), np.float32)
        ro.flags.writeable = False
        seq.attend(0, np.zeros((8, 32), np.float32), out=ro)
    with pytest.raises(TypeError, match="non-native byte order"):
        seq.attend(0, np.zeros((8, 32), ">f4"))


def test_nothing_changes_on_failure(rt, rng):
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 5), kv(rng, 5))
    bad = kv(rng, 1)
    bad[0, 1, 3] = np.nan
    with pytest.raises(kvrt.InvalidArgumentError, match="non-finite"):
        seq.append(0, bad, kv(rng, 1))
    assert seq.length(0) == 5


def test_layer_out_of_range_and_released_sequence(rt, rng):
    seq = rt.sequence()
    with pytest.raises(kvrt.InvalidArgumentError, match="layer 2 is out of range"):
        seq.prefill(2, None, kv(rng, 5), kv(rng, 5))
    seq.release()
    seq.release()  # idempotent
    other = rt.sequence()
    other.id = seq.id  # a stale id reaches the library
    other._released = True
    with pytest.raises(kvrt.NotFoundError):
        rt._impl.seq_length(seq.id, 0)
    with pytest.raises(kvrt.NotFoundError):
        rt._impl.seq_wait(seq.id)


def test_closed_runtime(rng):
    rt = kvrt.Runtime(**SHAPE, dtype="f32")
    seq = rt.sequence()
    rt.close()
    rt.close()
    with pytest.raises(kvrt.FailedPreconditionError, match="closed"):
        seq.append(0, kv(rng, 1), kv(rng, 1))
    seq.release()  # no error after close


def test_close_waits_for_the_calls_of_other_threads(rng):
    # close() while another thread is inside an attend (without the GIL) destroyed the runtime
    # under it: the interpreter died (SIGSEGV / SIGFPE). Now close() waits for the calls in
    # flight, and the worker's next call raises.
    import threading
    import time
    rt = kvrt.Runtime(**SHAPE, dtype="f32", index_kind="exact")
    seq = rt.sequence()
    for layer in range(2):
        seq.prefill(layer, None, kv(rng, 3000), kv(rng, 3000))
    q = rng.standard_normal((8, 32), dtype=np.float32)
    seen = {"attends": 0}

    def worker():
        try:
            while True:
                seq.attend(seen["attends"] % 2, q)
                seen["attends"] += 1
        except kvrt.FailedPreconditionError as e:
            seen["error"] = e

    t = threading.Thread(target=worker)
    t.start()
    while seen["attends"] < 3:
        time.sleep(0.001)
    rt.close()
    t.join(timeout=60)
    assert not t.is_alive()
    assert "closed" in str(seen.get("error")), seen


def test_integers_past_int32_are_refused_by_name(rt, rng):
    # They raised nanobind's TypeError ("incompatible function arguments"), naming nothing.
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 4), kv(rng, 4))
    for call, what in [(lambda: seq.length(2**31), "layer"),
                       (lambda: seq.attended(0, -2**40), "q_head"),
                       (lambda: rt.set_search_effort(2**31), "effort"),
                       (lambda: rt.set_head_policy(0, 0, 2**33), "policy"),
                       (lambda: kvrt.describe_search("ivf", 2**40), "top_k")]:
        with pytest.raises(kvrt.InvalidArgumentError, match=f"{what} = .* is out of range"):
            call()


def test_gpu_without_cuda_is_unimplemented_or_works():
    try:
        rt = kvrt.Runtime(**SHAPE, use_gpu=1)
    except kvrt.UnimplementedError as e:
        assert "CUDA" in str(e) and isinstance(e, NotImplementedError)
    else:
        assert rt.config.use_gpu == 1


def test_attend_batch_names_the_failing_sequence(rt, rng):
    a, b = rt.sequence(), rt.sequence()
    a.prefill(0, None, kv(rng, 5), kv(rng, 5))
    out = np.zeros((2, 8, 32), np.float32)
    with pytest.raises(kvrt.FailedPreconditionError, match=f"sequence {b.id}"):
        rt.attend_batch([a, b], 0, np.ones((2, 8, 32), np.float32), out=out)
    assert out[0].any() and not out[1].any()  # the good row is written, the failed one not


def test_append_attend_checks_every_tensor_and_stops_at_a_failed_append(rt, rng):
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 5), kv(rng, 5))
    q = np.ones((8, 32), np.float32)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"Sequence.append_attend.*v has shape"):
        seq.append_attend(0, q, kv(rng, 1), kv(rng, 2))
    with pytest.raises(kvrt.InvalidArgumentError, match=r"Sequence.append_attend.*q has shape"):
        seq.append_attend(0, np.ones((4, 32), np.float32), kv(rng, 1), kv(rng, 1))
    assert seq.length(0) == 5  # nothing appended
    out = np.zeros((8, 32), np.float32)
    with pytest.raises(kvrt.InvalidArgumentError, match="layer"):
        seq.append_attend(7, q, kv(rng, 1), kv(rng, 1), out=out)
    assert not out.any() and seq.length(0) == 5  # the append failed: nothing attended


def test_append_attend_batch_names_the_sequence_whose_append_failed(rt, rng):
    a, b = rt.sequence(), rt.sequence()
    a.prefill(0, None, kv(rng, 5), kv(rng, 5))
    b.release()
    out = np.zeros((2, 8, 32), np.float32)
    with pytest.raises(kvrt.NotFoundError, match=f"sequence {b.id}"):
        rt.append_attend_batch([a, b], 0, np.ones((2, 8, 32), np.float32), kv(rng, 2),
                               kv(rng, 2), out=out)
    assert not out.any()  # nothing attended
    assert a.length(0) == 6  # the append before the failed one stands
    with pytest.raises(kvrt.InvalidArgumentError, match="k has shape"):
        rt.append_attend_batch([a], 0, np.ones((1, 8, 32), np.float32), kv(rng, 2), kv(rng, 1))


def test_every_status_has_a_class():
    for status in range(1, 9):
        e = kvrt._errors.make_error(status, "call", "msg")
        assert type(e) is not kvrt.KvrtError and e.status == status
        assert e.status_name == kvrt._kvrt.status_string(status)


def test_torch_tensors_cross_as_capsules_with_the_same_results_and_errors(rt, rng):
    """A plain torch tensor crosses as a DLPack capsule (the fast path), gives what the NumPy
    array with the same data gives, and a bad one is refused with the same message."""
    torch = pytest.importorskip("torch")
    from kvrt._runtime import _arg
    k, v = kv(rng, 20), kv(rng, 20)
    q = rng.standard_normal((8, 32), dtype=np.float32)
    assert type(_arg(torch.from_numpy(q))).__name__ == "PyCapsule"
    assert _arg(q) is q  # NumPy: nanobind reads the array itself
    a, b = rt.sequence(), rt.sequence()
    a.prefill(0, None, k, v)
    b.prefill(0, None, torch.from_numpy(k), torch.from_numpy(v))
    want = a.attend(0, q)
    got = b.attend(0, torch.from_numpy(q), out=torch.empty(8, 32))
    np.testing.assert_array_equal(got.numpy(), want)
    for bad, what in [(torch.zeros(8, 32, dtype=torch.float64), "dtype float64; expected f32"),
                      (torch.zeros(8, 64)[:, ::2], "not contiguous"),
                      (torch.zeros(8, 16), r"shape \(8, 16\); expected \(8, 32\)")]:
        with pytest.raises(kvrt.InvalidArgumentError, match=what):
            b.attend(0, bad)


@pytest.mark.parametrize("framework", ["numpy", "torch"])
def test_an_empty_tensor_is_named_as_such(rt, framework):
    # torch's empty tensors carry no data pointer: the error must still say what is wrong, not
    # that a pointer was NULL.
    seq = rt.sequence()
    k = np.zeros((0, 2, 32), np.float32)
    if framework == "torch":
        torch = pytest.importorskip("torch")
        k = torch.from_numpy(k)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"k has shape \(0, 2, 32\): no tokens"):
        seq.append(0, k, k)
    with pytest.raises(kvrt.InvalidArgumentError, match="no tokens"):
        seq.prefill(0, None, k, k)


def test_lse_errors_name_it_as_an_output(rt):
    seq = rt.sequence()
    seq.prefill(0, None, np.ones((4, 2, 32), np.float32), np.ones((4, 2, 32), np.float32))
    q, out = np.ones((8, 32), np.float32), np.zeros((8, 32), np.float32)
    with pytest.raises(kvrt.InvalidArgumentError, match=r"lse has dtype float64; expected f32 "
                                                        r"\(outputs are f32\)"):
        seq.attend(0, q, out, lse=np.zeros(8, np.float64))
    with pytest.raises(kvrt.InvalidArgumentError, match="lse overlaps out"):
        seq.attend(0, q, out, lse=out.reshape(-1)[3:11])


def test_one_attend_with_lse_reads_as_one_attend(rt):
    # With lse the call is a batch of one inside; its errors said "attend_batch: sequence 0: "
    # and "batch row 0" (0.3.36).
    seq = rt.sequence()
    seq.prefill(0, None, np.ones((40, 2, 32), np.float32), np.ones((40, 2, 32), np.float32))
    q, out, lse = np.ones((8, 32), np.float32), np.zeros((8, 32), np.float32), np.zeros(8, np.float32)
    q[0, 1] = np.nan
    for call in (lambda: seq.attend(0, q, out, lse=lse),
                 lambda: seq.append_attend(0, q, np.ones((1, 2, 32), np.float32),
                                           np.ones((1, 2, 32), np.float32), out, lse=lse)):
        with pytest.raises(kvrt.InvalidArgumentError) as e:
            call()
        assert "attend: q holds a non-finite value at token 0, head 0, element 1" in str(e.value)
        assert "batch" not in str(e.value)
    other = rt.sequence()
    with pytest.raises(kvrt.FailedPreconditionError) as e:
        other.attend(0, np.ones((8, 32), np.float32), out, lse=lse)
    assert "batch" not in str(e.value) and "attend:" in str(e.value)


def test_torch_outputs_autograd_tracks_are_refused_and_negated_views_read_as_values(rt, rng):
    """kvrt writes out/lse outside autograd: a tensor autograd tracks (or saved for backward)
    came out of backward with silently wrong gradients; torch's own in-place writes refuse it.
    A lazily negated view (storage -t) was read as its storage."""
    torch = pytest.importorskip("torch")
    seq = rt.sequence()
    seq.prefill(0, None, kv(rng, 40), kv(rng, 40))
    q = torch.from_numpy(rng.standard_normal((8, 32), dtype=np.float32))
    for out in (torch.zeros(8, 32, requires_grad=True),
                torch.nn.Parameter(torch.zeros(8, 32))):
        with pytest.raises(ValueError, match="out requires grad"):
            seq.attend(0, q, out=out)
        assert not out.detach().any()
    with pytest.raises(ValueError, match="lse requires grad"):
        seq.attend(0, q, lse=torch.zeros(8, requires_grad=True))
    with torch.inference_mode():
        frozen = torch.zeros(8, 32)
    with pytest.raises(ValueError, match="inference tensor"):
        seq.attend(0, q, out=frozen)
    neg = torch._neg_view(-q)  # values q, storage -q
    assert neg.is_neg()
    np.testing.assert_array_equal(seq.attend(0, neg).numpy(), seq.attend(0, q).numpy())
    with pytest.raises(ValueError, match="negated view"):
        seq.attend(0, q, out=torch._neg_view(torch.zeros(8, 32)))


def test_a_batch_of_no_sequences_says_so(rt, rng):
    q = np.zeros((0, 8, 32), np.float32)
    with pytest.raises(ValueError, match="attend_batch: needs at least one sequence"):
        rt.attend_batch([], 0, q)
