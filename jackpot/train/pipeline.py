"""The background generator of `rollout.async_steps = k > 0`: one thread sampling batches in the order they are
submitted, each with the weights sent along.

The schedule (which batch, which weights, when) is the rollout source's (`jackpot.train.rollout_source`); this
module is the thread. It samples from an engine of its own that holds a copy of the weights (`hf` with
`own_copy`, or an engine that always holds one), which receives each job's weights before sampling, so the
trainer's in-place updates never race with sampling. A failure in the generator reaches the trainer when it asks
for that batch, as one error naming the step; closing the generator drops what is queued and never waits for a
generate in progress (its thread is a daemon).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from jackpot.rollout.base import RolloutBatch, RolloutEngine


@dataclass
class Generated:
    """A batch from the generator, with the engine's time on it and how long the engine sat idle before it."""

    batch: RolloutBatch
    seconds: float
    idle_s: float


class GeneratorError(RuntimeError):
    """The background generator failed on a batch; the original exception is the cause."""


class Generator:
    """One background thread sampling batches in the order they are submitted, each with the weights sent along."""

    def __init__(self, engine: RolloutEngine, threads: int):
        if not engine.holds_weights:
            raise ValueError("the generator's engine must hold a copy of the weights (hf: own_copy=True)")
        self.engine = engine
        self.threads = threads
        self.futures: dict[int, Future] = {}  # step -> its batch, in submission order, until trained on
        self.last_step = 0  # the latest step whose batch was submitted (or restored)
        self._jobs: queue.Queue = queue.Queue()
        self._last_end: float | None = None
        self._thread = threading.Thread(target=self._work, name="jackpot-generator", daemon=True)
        self._thread.start()

    def submit(self, step: int, version: int, weights: list[tuple[str, torch.Tensor]] | None,
               generate: Callable[[RolloutEngine], RolloutBatch]) -> None:
        """Queue `step`'s batch: `generate(engine)` once the engine holds `weights`, stamped `version` (None: the
        engine already holds that version)."""
        future: Future = Future()
        self.futures[step], self.last_step = future, step
        self._jobs.put((future, version, weights, generate))

    def restore(self, batches: dict[int, RolloutBatch]) -> None:
        """Batches generated before a checkpoint, trained on as if just generated."""
        for step, batch in sorted(batches.items()):
            future: Future = Future()
            future.set_result(Generated(batch, 0.0, 0.0))
            self.futures[step], self.last_step = future, step

    def result(self, step: int) -> tuple[Generated, float]:
        """(`step`'s batch, seconds waited for it), no longer in flight; GeneratorError if generating it failed."""
        start = time.perf_counter()
        generated = self._wait(step)
        del self.futures[step]
        return generated, time.perf_counter() - start

    def inflight(self) -> dict[int, RolloutBatch]:
        """The submitted batches not yet trained on, waited for (a checkpoint holds them)."""
        return {step: self._wait(step).batch for step in sorted(self.futures)}

    def _wait(self, step: int) -> Generated:
        future = self.futures[step]  # KeyError: never submitted
        try:
            return future.result()
        except BaseException as e:
            raise GeneratorError(f"the rollout generator failed on the batch of step {step}: "
                                 f"{type(e).__name__}: {e}") from e

    def close(self) -> None:
        """Drop the queued jobs and stop the thread after the job in progress (not waited for)."""
        while True:
            try:
                future, *_ = self._jobs.get_nowait()
            except queue.Empty:
                break
            future.cancel()
        self._jobs.put(None)

    def _work(self) -> None:
        torch.set_num_threads(self.threads)
        while (job := self._jobs.get()) is not None:
            future, version, weights, generate = job
            if not future.set_running_or_notify_cancel():
                continue
            start = time.perf_counter()
            idle = 0.0 if self._last_end is None else start - self._last_end
            try:
                if weights is not None:
                    self.engine.sync_weights(weights, version)
                batch = generate(self.engine)
            except BaseException as e:  # handed to the trainer, which raises it when it asks for this batch
                future.set_exception(e)
            else:
                future.set_result(Generated(batch, time.perf_counter() - start, idle))
            self._last_end = time.perf_counter()
