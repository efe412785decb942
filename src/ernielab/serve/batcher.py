"""Request batching for `ernielab serve`: a bounded queue of jobs and one worker thread that runs the model.

Jobs whose sampling settings match (`Settings`: size, steps, guidance, shift, negative prompt, enhance flag)
and that wait at the same time are denoised in one pipeline call, up to `max_batch` images. Each job keeps its
own seeds (image i of a job starts from the noise of seed + i), so an image does not depend on its batch.

The event loop only appends to the queue and awaits `job.future`; the worker resolves each future exactly once
(with an `Outcome`) through `loop.call_soon_threadsafe`, so the loop never waits on the model. A cancelled job
leaves the queue at once; a batch whose jobs are all cancelled is stopped before its next denoising step.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import logging
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable

import torch

from ernielab.image.pipeline import resolve_enhancer_check

log = logging.getLogger("ernielab.serve")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What must match for two jobs to share one pipeline call."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    shift: float
    negative_prompt: str
    enhance: bool


@dataclasses.dataclass
class Outcome:
    """A job's one answer: `status` 200 with `images`, or an HTTP error status with `message`."""

    status: int
    message: str = ""
    images: list[dict] = dataclasses.field(default_factory=list)


class QueueFull(Exception):
    pass


class _Aborted(Exception):
    """Raised inside the pipeline (from a forward pre-hook) when every job of the running batch is cancelled."""


class Job:
    def __init__(self, prompts: list[str], seed: int, settings: Settings, loop: asyncio.AbstractEventLoop):
        self.id = uuid.uuid4().hex
        self.prompts = prompts
        self.seed = seed
        self.settings = settings
        self.loop = loop
        self.future: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue = asyncio.Queue()  # progress events, read by the SSE stream
        self.position = 0  # in the queue when submitted (0 = next)
        self.state = "queued"  # queued -> running -> done | error | cancelled
        self.cancelled = False
        self.enqueued = time.monotonic()
        self.fallbacks: list[dict | None] = [None] * len(prompts)  # enhancer rewrites refused, per prompt

    # called from the worker thread
    def _emit(self, event: str, data: dict) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (event, data))

    def _resolve(self, outcome: Outcome) -> None:
        def settle():
            if not self.future.done():
                self.future.set_result(outcome)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Batcher:
    def __init__(self, pipe, *, max_batch: int = 8, queue_size: int = 64, batch_wait: float = 0.005,
                 enhancer_factory: Callable[[], Any] | None = None, metrics=None):
        if max_batch < 1 or queue_size < 1:
            raise ValueError("max_batch and queue_size must be >= 1")
        self.pipe = pipe
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.batch_wait = batch_wait
        self.enhancer_factory = enhancer_factory
        self._enhancer = None
        self.metrics = metrics
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: list[Job] = []
        self._step = 0
        self._total = 1
        self._stop = False
        self._thread: threading.Thread | None = None
        self.pipeline_calls = 0
        modules = [pipe.transformer] + ([pipe.finisher] if getattr(pipe, "finisher", None) is not None else [])
        for module in modules:  # one forward = one sampling step for the whole batch (CFG is batched)
            module.register_forward_pre_hook(self._before_step)
            module.register_forward_hook(self._after_step)

    # ---- event-loop side ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ernielab-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            left = list(self._pending)
            self._pending.clear()
            for job in self._running:
                job.cancelled = True
            self._cond.notify_all()
        for job in left:
            job._resolve(Outcome(503, "the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_length(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> int:
        """Queue `job`; its position (0 = next). QueueFull when `queue_size` jobs already wait."""
        with self._cond:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); try again later")
            self._pending.append(job)
            position = len(self._pending) - 1
            self._gauge()
            self._cond.notify()
        return position

    def cancel(self, job: Job) -> None:
        """The client is gone (or its time is up): free its slot. A queued job leaves the queue; a running batch
        stops at its next step once all of its jobs are cancelled."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:
                self._pending.remove(job)
                self._gauge()
                job.state = "cancelled"
                job._resolve(Outcome(499, "cancelled"))

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_length.set(len(self._pending))

    # ---- worker side --------------------------------------------------------------------------------
    def _before_step(self, module, args):
        if self._running and all(job.cancelled for job in self._running):
            raise _Aborted()

    def _after_step(self, module, args, output):
        self._step += 1
        for job in self._running:
            if not job.cancelled:
                job._emit("progress", {"id": job.id, "step": min(self._step, self._total), "steps": self._total})

    def _take(self) -> list[Job]:
        """The oldest job plus every waiting job with the same settings, up to `max_batch` images (a job larger
        than that runs alone, in chunks)."""
        first = self._pending.popleft()
        batch, total = [first], len(first.prompts)
        for job in list(self._pending):
            if job.settings == first.settings and total + len(job.prompts) <= self.max_batch:
                self._pending.remove(job)
                batch.append(job)
                total += len(job.prompts)
        self._gauge()
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
            if self.batch_wait > 0:
                time.sleep(self.batch_wait)  # let requests sent at the same moment arrive and join the batch
            with self._cond:
                if not self._pending:
                    continue
                batch = self._take()
                self._running = batch
            try:
                self._execute(batch)
            except BaseException as e:  # never leave a job without an answer, never let the worker die
                log.exception("worker failed")
                for job in batch:
                    job._resolve(Outcome(500, f"internal error: {type(e).__name__}"))
            finally:
                with self._cond:
                    self._running = []

    def _enhancer_model(self):
        if self._enhancer is None:
            if self.enhancer_factory is None:
                raise ValueError("this server has no prompt enhancer")
            self._enhancer = self.enhancer_factory()
        return self._enhancer

    def _execute(self, batch: list[Job]) -> None:
        s = batch[0].settings
        now = time.monotonic()
        for job in batch:
            job.state = "running"
            job._emit("started", {"id": job.id, "batch_requests": len(batch),
                                  "batch_images": sum(len(j.prompts) for j in batch)})
            if self.metrics is not None:
                self.metrics.queue_wait.observe(now - job.enqueued)
        try:
            revised = self._revise(batch, s)
            if all(job.cancelled for job in batch):
                raise _Aborted()
            noise = torch.cat([self.pipe.initial_noise(len(job.prompts), s.height, s.width, job.seed)
                               for job in batch])
            prompts = [p for r in revised for p in r]
            self._step = 0
            chunks = -(-len(prompts) // self.max_batch)
            self._total = s.steps * chunks  # forwards in this call (the finisher's steps are among `steps`)
            started = time.monotonic()
            self.pipeline_calls += 1
            if self.metrics is not None:
                self.metrics.batch_images.observe(len(prompts))
                self.metrics.batch_requests.observe(len(batch))
            out = self.pipe(prompts, negative_prompt=s.negative_prompt, height=s.height, width=s.width,
                            num_inference_steps=s.steps, guidance_scale=s.guidance_scale, shift=s.shift,
                            batch_size=max(self.max_batch, 1), latents=noise, output_type="pil")
            if self.metrics is not None:
                self.metrics.pipeline_seconds.observe(time.monotonic() - started)
        except _Aborted:
            for job in batch:
                job.state = "cancelled"
                job._resolve(Outcome(499, "cancelled"))
            if self.metrics is not None:
                self.metrics.aborted_batches.inc()
            return
        except ValueError as e:
            for job in batch:
                job.state = "error"
                job._resolve(Outcome(400, str(e)))
            return
        self._deliver(batch, revised, out.images)

    def _revise(self, batch: list[Job], s: Settings) -> list[list[str]]:
        """Each job's prompts as the pipeline gets them: enhanced when asked (not for cancelled jobs). A rewrite
        that contradicts its prompt (the enhancer's own check, as `generate --enhance` applies it) is dropped
        for the prompt, and the reasons go back with the image."""
        revised: list[list[str]] = []
        for job in batch:
            job.fallbacks = [None] * len(job.prompts)
            if s.enhance and not job.cancelled:
                enhancer = self._enhancer_model()
                rewrites = enhancer.enhance_many(job.prompts, width=s.width, height=s.height, seed=job.seed)
                check = resolve_enhancer_check(enhancer, "auto")
                for k, (prompt, rewrite) in enumerate(zip(job.prompts, rewrites)):
                    reasons = check(prompt, rewrite) if check is not None else []
                    if reasons:
                        job.fallbacks[k] = {"rewrite": rewrite, "reasons": list(reasons)}
                        rewrites[k] = prompt
                revised.append(list(rewrites))
            else:
                revised.append(list(job.prompts))
        return revised

    def _deliver(self, batch: list[Job], revised: list[list[str]], out_images: list) -> None:
        """Hand each job its slice of the batch's images (as base64 PNGs), or 499 when it was cancelled."""
        i = 0
        for job, texts in zip(batch, revised):
            n = len(job.prompts)
            images = [{"b64_png": png_b64(im), "seed": job.seed + k, "prompt": job.prompts[k],
                       "revised_prompt": texts[k], "enhancer_fallback": job.fallbacks[k],
                       "width": im.size[0], "height": im.size[1]}
                      for k, im in enumerate(out_images[i : i + n])]
            i += n
            if job.cancelled:
                job.state = "cancelled"
                job._resolve(Outcome(499, "cancelled"))
                continue
            job.state = "done"
            if self.metrics is not None:
                self.metrics.images.inc(n)
            job._resolve(Outcome(200, images=images))
