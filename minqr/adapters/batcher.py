"""Dynamic batching: texts from requests that arrive together are scored in one forward pass.

    batcher = DynamicBatcher(score, max_batch=32)      # score: token lists -> outputs [M, N]
    outputs = batcher.submit(token_lists).result()     # from any thread; [len(token_lists), N]
    batcher.close()                                    # scores what was submitted, then stops

A reward server's clients each send a few texts; a forward pass over one text costs nearly as much
as over many (on a GPU, and on a CPU for short texts, where the fixed cost of a call dominates).
One worker thread owns the model. While it runs a forward, new requests queue up; when it is
done it takes every queued request, oldest first, up to `max_batch` texts, and scores them
together. No timer waits for a batch to fill: an idle server answers a lone request at once, a
busy one batches by itself, as deep as its load.

A request's texts are never split across forwards (a request larger than `max_batch` goes alone;
the score function batches it further), and identical texts in one forward are scored once (the
G samples of a GRPO group share their reference reply). Rows go back to their own request by
position: request r's outputs are the rows of its texts, in its order.

A hazard of sharing a forward: texts packed side by side in one row (minqr/data/batching.py) are
kept apart by the attention mask, but a NaN or an infinity in one text's states still reaches its
row-mates (a masked weight is 0, and 0 × NaN is NaN). So when a shared forward gives any row that is
not finite, each of its requests is scored again in a forward of its own: a request that overflows
gets its own error, and the others their own outputs.
"""
import collections
import threading
from concurrent.futures import Future

import numpy as np

from minqr.study.scoring import distinct_texts


class DynamicBatcher:
    """One worker thread that runs `score(token_lists) -> np.ndarray [M, N]` over the texts of the
    requests queued since its last forward, at most `max_batch` texts a forward."""

    def __init__(self, score, max_batch: int):
        self.score, self.max_batch = score, max_batch
        self._pending = collections.deque()  # (token lists, future), oldest first
        self._ready = threading.Condition()
        self._closed = False
        self.forwards = 0  # forward calls so far, and the texts they scored (for tests and logs)
        self.texts_scored = 0
        self._worker = threading.Thread(target=self._run, name="minqr-batcher", daemon=True)
        self._worker.start()

    def submit(self, token_lists: list) -> Future:
        """Queue one request's texts (token lists); the future's result is their outputs [M, N] in
        that order, or the exception the score function raised on their forward."""
        future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append((token_lists, future))
            self._ready.notify()
        return future

    def close(self) -> None:
        """Score every request already submitted, then stop the worker (returns when it has)."""
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._worker.join()

    def _next_batch(self) -> list | None:
        """The requests of the next forward (None: closed and nothing left)."""
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if not self._pending:
                return None
            batch = [self._pending.popleft()]
            size = len(batch[0][0])
            while self._pending and size + len(self._pending[0][0]) <= self.max_batch:
                size += len(self._pending[0][0])
                batch.append(self._pending.popleft())
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            texts, where = distinct_texts([tokens for token_lists, _ in batch for tokens in token_lists])
            try:
                outputs = self._forward(texts)  # [U, N]
            except Exception as error:  # the requests fail, the worker lives on for the next ones
                for _, future in batch:
                    future.set_exception(error)
                continue
            if len(batch) > 1 and not np.isfinite(outputs).all():  # the module docstring's hazard
                for request in batch:
                    self._score_alone(*request)
                continue
            start = 0
            for token_lists, future in batch:
                future.set_result(outputs[where[start: start + len(token_lists)]])  # [M, N], the request's rows
                start += len(token_lists)

    def _score_alone(self, token_lists: list, future: Future) -> None:
        texts, where = distinct_texts(token_lists)
        try:
            future.set_result(self._forward(texts)[where])  # [M, N]
        except Exception as error:
            future.set_exception(error)

    def _forward(self, texts: list) -> np.ndarray:
        outputs = np.asarray(self.score([list(tokens) for tokens in texts]))  # [U, N]
        self.forwards += 1
        self.texts_scored += len(texts)
        return outputs
