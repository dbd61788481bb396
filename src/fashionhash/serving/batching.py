"""Photo uploads that arrive together are encoded together.

On a CPU the backbone is the cost of a photo search (two passes, ~8 ms, against ~1 ms for
the search itself), and a batch of photos costs less per photo than the same photos one by
one. :class:`PhotoBatcher` runs one worker thread that takes every upload waiting when it
is free (at most ``max_batch``) and encodes them in one call, so under load the batches
grow by themselves and with one client nothing waits: a lone upload is encoded at once.
Measured with 4 clients on 2 cores (docs/results.md, "Serving on the two-stage path"):
the same throughput as two uploads encoded side by side, with a shorter tail, because
every upload of a batch is answered when the batch is done instead of some waiting behind
two others.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Sequence

#: what a worker finds in the queue when the batcher closes
_STOP = object()


class PhotoBatcher:
    """``batcher(data) -> result``: blocks until the photo's batch is encoded.

    ``encode_many(datas) -> results`` encodes a list of uploads in order; an item of its
    result that is an exception is raised to that upload's caller only. An exception of
    ``encode_many`` itself goes to every caller of the batch.
    """

    def __init__(self, encode_many: Callable[[Sequence[bytes]], list[Any]], max_batch: int = 4) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.max_batch = int(max_batch)
        self._encode_many = encode_many
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="fh-photo-batcher", daemon=True)
        self._worker.start()

    def __call__(self, data: bytes) -> Any:
        if self._closed:
            raise RuntimeError("the photo batcher is closed")
        future: Future = Future()
        self._queue.put((data, future))
        return future.result()

    def close(self) -> None:
        """Stop the worker after the uploads already queued."""
        if not self._closed:
            self._closed = True
            self._queue.put(_STOP)
            self._worker.join()

    def _next_batch(self) -> list[tuple[bytes, Future]] | None:
        """The uploads waiting now (blocks for the first); None once closed."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # seen again after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                results = self._encode_many([data for data, _ in batch])
            except BaseException as e:  # noqa: BLE001 - every caller of the batch gets it
                for _, future in batch:
                    future.set_exception(e)
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
