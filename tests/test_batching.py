"""The photo batcher: uploads waiting together are encoded in one call, each caller gets its
own result or its own error, and a lone upload is not held back."""
from __future__ import annotations

import threading
import time

import pytest

from fashionhash.serving.batching import PhotoBatcher


class Recorder:
    """encode_many that records its batches; ``gate`` holds the first call until set, so
    that the uploads sent meanwhile queue up behind it."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.gate = threading.Event()

    def __call__(self, datas):
        self.batches.append(list(datas))
        if len(self.batches) == 1:
            assert self.gate.wait(10)
        return [ValueError(f"bad {d!r}") if d.startswith(b"bad") else d.upper() for d in datas]


def _call_all(batcher: PhotoBatcher, datas: list[bytes]) -> tuple[list[threading.Thread], dict[bytes, object]]:
    """One caller thread per upload, started; what each got lands in the dict."""
    out: dict[bytes, object] = {}

    def one(d: bytes) -> None:
        try:
            out[d] = batcher(d)
        except Exception as e:  # noqa: BLE001 - the test looks at which caller got what
            out[d] = e

    threads = [threading.Thread(target=one, args=(d,)) for d in datas]
    for t in threads:
        t.start()
    return threads, out


def test_waiting_uploads_form_one_batch_and_each_caller_gets_its_own_answer():
    rec = Recorder()
    batcher = PhotoBatcher(rec, max_batch=4)
    try:
        first = threading.Thread(target=batcher, args=(b"first",))
        first.start()
        while not rec.batches:  # the worker is busy with the first upload
            time.sleep(0.01)
        datas = [b"a", b"bad1", b"c", b"d", b"e"]
        threads, out = _call_all(batcher, datas)
        while batcher._queue.qsize() < len(datas):
            time.sleep(0.01)
        rec.gate.set()
        for t in [first, *threads]:
            t.join(10)
    finally:
        batcher.close()
    # the five that waited went in batches of at most 4, in arrival order
    assert rec.batches[0] == [b"first"]
    assert [len(b) for b in rec.batches[1:]] == [4, 1]
    assert sorted(d for b in rec.batches[1:] for d in b) == sorted(datas)
    assert out[b"a"] == b"A" and out[b"c"] == b"C" and out[b"e"] == b"E"
    assert isinstance(out[b"bad1"], ValueError) and "bad1" in str(out[b"bad1"])


def test_a_lone_upload_is_encoded_at_once():
    rec = Recorder()
    rec.gate.set()
    batcher = PhotoBatcher(rec, max_batch=8)
    try:
        assert batcher(b"x") == b"X" and batcher(b"y") == b"Y"
    finally:
        batcher.close()
    assert rec.batches == [[b"x"], [b"y"]]


def test_a_failing_batch_fails_each_of_its_callers_and_the_batcher_goes_on():
    calls = []

    def encode_many(datas):
        calls.append(datas)
        if len(calls) == 1:
            raise RuntimeError("backbone failed")
        return list(datas)

    batcher = PhotoBatcher(encode_many, max_batch=2)
    try:
        with pytest.raises(RuntimeError, match="backbone failed"):
            batcher(b"x")
        assert batcher(b"y") == b"y"
    finally:
        batcher.close()


def test_closed_batcher_refuses_and_bad_sizes_are_refused():
    batcher = PhotoBatcher(lambda datas: list(datas), max_batch=1)
    batcher.close()
    batcher.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        batcher(b"x")
    with pytest.raises(ValueError, match="max_batch"):
        PhotoBatcher(lambda datas: list(datas), max_batch=0)
