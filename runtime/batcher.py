"""Dynamic batching of already-checked inputs, for the server (runtime/serving.py).

Each request is decoded and checked on its own first, then its rows wait here to share one inference call
with other requests' rows: up to `max_rows` rows, waiting at most `max_delay_s` after the first row for
more (Triton's dynamic batcher: max_batch_size rows, max_queue_delay). A request's rows always stay
together and in order, and each request gets exactly its own rows back.

Multi-task artifacts: each request may name a task index (`submit(x, task=i)`); the batch then carries one
index per row, and requests for different tasks share one inference call (`infer(batch, task_ids)`), as
the graph picks each row's prompts and head itself.

Why not MLServer's own adaptive batcher: it merges raw requests before the model sees them, so one bad
request fails every request it was batched with, and request parameters (top_k) of one request are applied
to all. Batching checked float32 rows has neither problem, and mixes image and tensor requests freely.

One inference runs at a time, in a single worker thread: onnxruntime releases the GIL, so the event loop
keeps accepting (and queueing) requests meanwhile, and its own intra-op threads use the cores. Torch-free.
"""
from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


class Batcher:
    """`await batcher.submit(x)` with x float32 [n, ...] (1 <= n <= max_rows) returns infer()'s rows for x.

    infer(batch) -> [B, C] runs in one worker thread; on_batch(rows) is called with every batch's size
    (metrics). An exception from infer() goes to every request of that batch. max_requests=1 turns
    batching off (each request is one call) while keeping one call at a time. Requests submitted with a
    task index are inferred as infer(batch, task_ids) (int64 [B], one per row), and on_tasks(task_ids) is
    called after each such batch (metrics). `batch_stats`: batch size -> [inference calls, ns spent in
    them]; a request submitted with a `timing` dict gets its batch's "infer_ns" and "batch" rows in it."""

    def __init__(self, infer: Callable[..., np.ndarray], max_rows: int, max_delay_s: float,
                 on_batch: Callable[[int], None] | None = None, max_requests: int | None = None,
                 on_tasks: Callable[[np.ndarray], None] | None = None) -> None:
        if max_rows < 1 or not 0 <= max_delay_s <= 60 or (max_requests is not None and max_requests < 1):
            raise ValueError(f"max_rows and max_requests must be >= 1 and max_delay_s in [0, 60], got "
                             f"{max_rows}, {max_requests}, {max_delay_s}")
        self.infer, self.max_rows, self.max_delay_s, self.max_requests = infer, max_rows, max_delay_s, max_requests
        self.on_batch = on_batch or (lambda rows: None)
        self.on_tasks = on_tasks or (lambda task_ids: None)
        self._pending: collections.deque = collections.deque()  # (x, future, task), in arrival order
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vfpt-infer")
        self.batch_stats: dict[int, list[int]] = {}
        self._timings: dict = {}  # future -> the timing dict its submit() was given

    async def submit(self, x: np.ndarray, task: int | None = None, timing: dict | None = None) -> np.ndarray:
        if not 1 <= len(x) <= self.max_rows:
            raise ValueError(f"a request of {len(x)} rows does not fit batches of at most {self.max_rows}")
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():  # created here: the queue lives on the serving loop
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._run())
        future = loop.create_future()
        self._pending.append((x, future, task))
        self._arrived.set()
        if timing is None:
            return await future
        self._timings[future] = timing
        try:
            return await future
        finally:
            self._timings.pop(future, None)

    def _queued_rows(self) -> int:
        return sum(len(x) for x, _, _ in self._pending)

    async def _wait_for_rows(self) -> None:
        """Until max_rows rows are queued or max_delay_s has passed since this batch's first request."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_delay_s
        while self._queued_rows() < self.max_rows and len(self._pending) < (self.max_requests or self.max_rows):
            left = deadline - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except asyncio.TimeoutError:
                return

    def _take(self) -> list:
        """Whole requests from the front of the queue, as many as fit in max_rows (at least one)."""
        taken, rows = [], 0
        while (self._pending and rows + len(self._pending[0][0]) <= self.max_rows
               and len(taken) < (self.max_requests or self.max_rows)):
            x, future, task = self._pending.popleft()
            rows += len(x)
            if not future.done():  # a client that went away (cancelled) takes no room
                taken.append((x, future, task))
        return taken

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            await self._wait_for_rows()
            taken = self._take()
            if not taken:
                continue
            try:
                batch = np.concatenate([x for x, _, _ in taken]) if len(taken) > 1 else taken[0][0]
                ids = _task_ids(taken)
                started = time.perf_counter_ns()
                out = await loop.run_in_executor(self._pool, self._infer, batch, ids)
                ns = time.perf_counter_ns() - started
                calls = self.batch_stats.setdefault(len(batch), [0, 0])
                calls[0], calls[1] = calls[0] + 1, calls[1] + ns
                for _, future, _ in taken:
                    if future in self._timings:
                        self._timings[future].update(infer_ns=ns, batch=len(batch))
                self.on_batch(len(batch))
                if ids is not None:
                    self.on_tasks(ids)
            except asyncio.CancelledError:  # the server is stopping
                for _, future, _ in taken:
                    future.cancel()
                raise
            except Exception as e:  # the model failed on this batch: each of its requests hears why
                for _, future, _ in taken:
                    if not future.done():
                        future.set_exception(e)
                continue
            start = 0
            for x, future, _ in taken:
                if not future.done():
                    future.set_result(out[start:start + len(x)])
                start += len(x)

    def _infer(self, batch: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        return self.infer(batch) if ids is None else self.infer(batch, ids)

    def close(self) -> None:
        """Stop the batching task and the worker thread; requests still waiting are cancelled."""
        if self._task is not None:
            self._task.cancel()
        for _, future, _ in self._pending:
            if not future.done():
                future.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _task_ids(taken: list) -> np.ndarray | None:
    """One int64 task index per row of the batch (each request's own), or None when no request names one."""
    tasks = [task for _, _, task in taken]
    if all(t is None for t in tasks):
        return None
    if any(t is None for t in tasks):
        raise ValueError("a batch mixes requests with and without a task index; submit all with one or none")
    return np.concatenate([np.full(len(x), task, dtype=np.int64) for x, _, task in taken])
