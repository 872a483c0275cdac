"""The policy server's request batcher: groups requests, calls the policy, splits the results.

Requests that arrive together share one `policy.batch` call: a worker on the event loop collects
up to `max_batch` requests, waiting at most `max_wait_ms` after the first one arrived, and runs
the policy in a worker thread so the loop keeps accepting requests. The batcher neither pads nor
warms up: the policy (`rt2_jax.policy.Policy`, `rt2_jax.export.SavedModelPolicy`) takes any
batch size, pads it to its own bucket sizes and compiles them in its `warmup()`. If a batch
raises, its requests are retried one by one so one bad request cannot fail its neighbours.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence

import numpy as np

log = logging.getLogger('rt2_jax.serve')


class RequestError(Exception):
  """Invalid client input: answered with `status` and the message, never a server failure."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


class ModelError(Exception):
  """The policy raised while running a request."""


@dataclasses.dataclass
class _Item:
  image: np.ndarray
  instruction: str
  future: asyncio.Future
  enqueued: float
  embodiment: str | None = None  # the robot dataset to decode for (a model of several)


class Batcher:
  """Collects requests on the event loop and runs them through `policy.batch` in a thread."""

  def __init__(
    self, policy, *, max_batch: int, max_wait_ms: float, max_queue: int, request_timeout_s: float
  ):
    self.policy, self.max_batch, self.max_wait_ms = policy, max_batch, max_wait_ms
    self.max_queue, self.request_timeout_s = max_queue, request_timeout_s
    self._pending: collections.deque[_Item] = collections.deque()
    self._wakeup: asyncio.Event | None = None
    self._task: asyncio.Task | None = None
    self._stopping = False
    # One thread: the policy runs one batch at a time; requests queue on the loop meanwhile.
    self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='policy')
    self.num_requests = self.num_batches = self.num_errors = 0
    self.batch_time_s = 0.0

  async def start(self) -> None:
    self._wakeup = asyncio.Event()
    self._task = asyncio.create_task(self._loop(), name='batcher')

  async def stop(self) -> None:
    """Finish everything queued, then stop the worker."""
    self._stopping = True
    if self._wakeup is not None:
      self._wakeup.set()
    if self._task is not None:
      await self._task
    self._executor.shutdown(wait=True)

  async def submit(
    self, images: Sequence[np.ndarray], instructions: Sequence[str], embodiment: str | None = None
  ) -> list:
    if self._stopping:
      raise RequestError('server is shutting down', 503)
    if len(self._pending) + len(images) > self.max_queue:
      raise RequestError(f'server overloaded: {len(self._pending)} requests queued', 503)
    loop = asyncio.get_running_loop()
    futures = []
    for image, instruction in zip(images, instructions, strict=True):
      fut = loop.create_future()
      self._pending.append(_Item(image, instruction, fut, loop.time(), embodiment))
      futures.append(fut)
    self._wakeup.set()
    try:
      return await asyncio.wait_for(asyncio.gather(*futures), self.request_timeout_s)
    except TimeoutError:
      raise RequestError(f'no result within {self.request_timeout_s} s', 504) from None
    finally:
      for fut in futures:  # a timed-out or cancelled request leaves the queue
        fut.cancel()

  async def _loop(self) -> None:
    loop = asyncio.get_running_loop()
    max_wait = self.max_wait_ms / 1000
    while True:
      while not self._pending:
        if self._stopping:
          return
        self._wakeup.clear()
        await self._wakeup.wait()
      # Wait for the batch to fill, counting from when its first request arrived.
      deadline = self._pending[0].enqueued + max_wait
      while len(self._pending) < self.max_batch and not self._stopping:
        remaining = deadline - loop.time()
        if remaining <= 0:
          break
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
          await asyncio.wait_for(self._wakeup.wait(), remaining)
      items, others = [], []
      while self._pending and len(items) < self.max_batch:
        item = self._pending.popleft()
        if item.future.done():  # skip requests that timed out while queued
          continue
        # One batch decodes for one embodiment; the others keep their place for the next.
        if items and item.embodiment != items[0].embodiment:
          others.append(item)
        else:
          items.append(item)
      self._pending.extendleft(reversed(others))
      if not items:
        continue
      t0 = time.perf_counter()
      try:
        results = await loop.run_in_executor(
          self._executor,
          self._run_isolated,
          [i.image for i in items],
          [i.instruction for i in items],
          items[0].embodiment,
        )
      except Exception as e:  # noqa: BLE001  (the worker must survive anything; answer 500)
        log.exception('batch failed outside the policy')
        results = [ModelError(f'{type(e).__name__}: {e}')] * len(items)
      self.batch_time_s += time.perf_counter() - t0
      self.num_batches += 1
      self.num_requests += len(items)
      for item, result in zip(items, results, strict=True):
        if item.future.done():
          continue
        if isinstance(result, BaseException):
          self.num_errors += 1
          item.future.set_exception(result)
        else:
          item.future.set_result(result)

  def _run_policy(
    self, images: list[np.ndarray], instructions: list[str], embodiment: str | None = None
  ) -> list:
    # Policies of one dataset (and exports) take no embodiment argument.
    named = {'embodiment': embodiment} if embodiment is not None else {}
    outputs = self.policy.batch(np.stack(images), list(instructions), **named)
    if len(outputs) != len(images):
      raise ModelError(f'policy.batch returned {len(outputs)} outputs for {len(images)} inputs')
    return list(outputs)

  def _run_isolated(self, images, instructions, embodiment=None) -> list:
    """Outputs, or one exception per request; a failing batch is retried request by request."""
    try:
      return self._run_policy(images, instructions, embodiment)
    except Exception as e:  # noqa: BLE001  (any policy failure becomes that request's 500)
      if len(images) == 1:
        log.exception('policy failed on %r', instructions[0])
        return [ModelError(f'{type(e).__name__}: {e}')]
    results = []
    for image, instruction in zip(images, instructions, strict=True):
      results.extend(self._run_isolated([image], [instruction], embodiment))
    return results
