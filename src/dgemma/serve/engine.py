"""The serving engine: one worker thread owns the model; requests become jobs on a queue.

Jobs that arrive together with the same settings share one batched diffusion run (fast mode makes every row's
arithmetic independent of its neighbours, so a seeded request gives the same tokens alone or under load). Runs are
advanced one forward pass at a time, round-robin, so a long request never blocks a short one and a diffusion
decode and an autoregressive decode of the same prompt race pass for pass.

Work is bounded: at most `max_running` jobs are decoded at once (the rest wait, up to `max_pending`, then submit
refuses), and a job past its deadline is stopped with an error event.
"""

from __future__ import annotations

import abc
import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..ar import ar_stream
from ..generate import Commit as StreamCommit
from ..generate import Done as StreamDone
from ..generate import Draft as StreamDraft
from ..generate import stream
from ..requests import PreparedRequest
from ..tokenizer import IncrementalText
from .events import Commit, Done, Draft, Error, Event, Text, TokenLogprob, finite_or_none

log = logging.getLogger(__name__)


class EngineBusy(Exception):
    """The engine's queue is full; the client should retry later."""


@dataclass
class Job:
    """One prepared request (one choice of it). `emit` receives the job's events from the worker thread (it must be
    thread-safe).

    The request's max_new_tokens is a hard cap on the returned tokens: diffusion runs whole canvases and the job
    keeps at most this many of their tokens (finish reason "length" when it cut)."""

    request: PreparedRequest
    emit: Callable[[Event], None]
    drafts: bool = False
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k: each returned token's log-probability and the top k
    markup: bool = False  # keep special tokens in the text (Gemma 4 writes its thought and call markers as such)
    deadline: float | None = None  # time.monotonic() after which the job is stopped
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Progress, owned by the worker.
    text: IncrementalText | None = None  # set by the engine (it holds the returned ids)
    steps: list[int] = field(default_factory=list)  # denoising passes per canvas (AR: one per token)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    cached_tokens: int | None = None  # prompt tokens restored from the engine's prefix cache
    finished: bool = False

    @property
    def ids(self) -> list[int]:
        return self.text.ids if self.text is not None else []

    @property
    def max_new_tokens(self) -> int:
        req = self.request
        return req.max_new_tokens if req.max_new_tokens is not None else req.gen.new_tokens(len(req.prompt_ids))

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def decoder(self) -> str:
        return self.request.decoder

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def active(self) -> bool:
        return not self.finished and not self.cancelled.is_set()


class _Run(abc.ABC):
    """A generator of events for some jobs; `step()` advances it by one forward pass."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.events: Iterator = iter(())

    @property
    def live(self) -> list[Job]:
        return [j for j in self.jobs if j.active]

    def step(self) -> bool:
        """Advance once; False when the run is over."""
        if not self.live:  # everyone left or stopped early: drop the remaining work
            close = getattr(self.events, "close", None)
            if close is not None:
                close()
            return False
        try:
            event = next(self.events)
        except StopIteration:
            for job in self.live:
                self.engine.finish(job, "length")
            return False
        self.handle(event)
        return bool(self.live)

    @abc.abstractmethod
    def handle(self, event) -> None:
        """Deliver one stream event to the run's jobs."""


class _DiffusionRun(_Run):
    def __init__(self, engine: Engine, jobs: list[Job]):
        super().__init__(engine, jobs)
        reqs = [j.request for j in jobs]
        gen = reqs[0].gen  # the jobs share a key: equal settings
        self.pad, self.eos = gen.pad_token_id, set(gen.eos_ids)
        constraints = [r.constraint for r in reqs]
        wanted = [j.logprobs for j in jobs if j.logprobs is not None]
        self.events = stream(engine.model, [r.prompt_ids for r in reqs], settings=gen,
                             seed=[r.seed for r in reqs], rng="fast",
                             constraint=constraints if any(c is not None for c in constraints) else None,
                             logprobs=max(wanted) if wanted else None, prefix_cache=engine.prefix_cache,
                             **self._image_inputs(reqs))

    @staticmethod
    def _image_inputs(reqs: list[PreparedRequest]) -> dict:
        """The batch's images in prompt order, row by row (what generate expects)."""
        with_images = [r.images for r in reqs if r.images is not None]
        if not with_images:
            return {}
        return {"pixel_values": torch.cat([i["pixel_values"] for i in with_images]),
                "image_position_ids": torch.cat([i["image_position_ids"] for i in with_images])}

    def handle(self, event) -> None:
        eng = self.engine
        if isinstance(event, StreamDraft):
            eng.forward_passes += 1  # one decoder pass for the whole batch
            for b, job in enumerate(self.jobs):
                if job.drafts and job.active:
                    ids = event.argmax[b].tolist()
                    job.emit(Draft(event.canvas_index, event.step, ids, eng.token_strings(ids),
                                   event.accepted[b].tolist(), finite_or_none(event.entropy[b].tolist()),
                                   bool(event.finished[b])))
        elif isinstance(event, StreamCommit):
            for b, job in enumerate(self.jobs):
                if event.cached_tokens is not None:
                    job.cached_tokens = event.cached_tokens[b]
                if job.active and event.steps[b] > 0:
                    self._commit(job, event.ids[b].tolist(), event.steps[b], event.canvas_index,
                                 bool(event.finished[b]), self._logprobs(job, event, b))
        elif isinstance(event, StreamDone):
            for job in self.live:
                eng.finish(job, "length")

    @staticmethod
    def _logprobs(job: Job, event: StreamCommit, b: int) -> list[TokenLogprob] | None:
        """Per position of row b's canvas, when the job asked for them."""
        if job.logprobs is None or event.logprobs is None:
            return None
        ids, chosen = event.ids[b].tolist(), event.logprobs[b].tolist()
        k = job.logprobs
        tops = ([list(zip(i[:k], v[:k])) for i, v in zip(event.top_logprobs[1][b].tolist(),
                                                          event.top_logprobs[0][b].tolist())]
                if k and event.top_logprobs is not None else [[] for _ in ids])
        return [TokenLogprob(t, lp, top) for t, lp, top in zip(ids, chosen, tops)]

    def _commit(self, job: Job, row: list[int], steps: int, canvas_index: int, row_finished: bool,
                logprobs: list[TokenLogprob] | None = None) -> None:
        kept_at = [i for i, t in enumerate(row) if self.pad is None or t != self.pad]
        kept_at = kept_at[:job.max_new_tokens - len(job.ids)]  # whole canvases ran; at most max_tokens come back
        kept = [row[i] for i in kept_at]
        new_logprobs = [logprobs[i] for i in kept_at] if logprobs is not None else []
        job.token_logprobs.extend(new_logprobs)
        job.steps.append(steps)
        self.engine.advance(job, kept, lambda text: Commit(text, row, self.engine.token_strings(row), canvas_index,
                                                           steps, logprobs=new_logprobs))
        if job.finished:  # a stop string
            return
        if row_finished and any(t in self.eos for t in kept):
            self.engine.finish(job, "stop")
        elif len(job.ids) >= job.max_new_tokens:
            self.engine.finish(job, "length")


class _ARRun(_Run):
    def __init__(self, engine: Engine, jobs: list[Job]):
        super().__init__(engine, jobs)
        (job,) = jobs
        gen = job.request.gen
        self.eos = set(gen.eos_ids)
        self.events = ar_stream(engine.model, job.request.prompt_ids, job.max_new_tokens,
                                eos_token_id=gen.eos_token_id, seed=job.seed)

    def handle(self, token: int) -> None:
        (job,) = self.jobs
        self.engine.forward_passes += 1
        job.steps.append(1)
        self.engine.advance(job, [token], lambda text: Commit(text, [token], self.engine.token_strings([token]),
                                                              forwards=len(job.steps)))
        if not job.finished and token in self.eos:
            self.engine.finish(job, "stop")


class Engine:
    """Owns the model and its worker thread. `submit` is thread-safe; events go to each job's `emit`.

    max_running: jobs decoded at once (rows of all runs); max_pending: jobs waiting beyond those."""

    def __init__(self, model, max_batch: int = 8, max_pending: int = 64, max_running: int = 16,
                 prefix_cache=None):
        self.model = model
        self.prefix_cache = prefix_cache  # a PrefixCache shared by every diffusion run, or None
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.max_running = max_running
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._waiting: collections.deque[Job] = collections.deque()  # taken off the queue, not yet running
        self._runs: list[_Run] = []
        self._closed = False
        self.forward_passes = 0  # decoder passes (a batched pass counts once); prefill and commits not counted
        self.runs_started = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="dgemma-engine", daemon=True)
        self._thread.start()

    # -- called from request handlers ------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        """Jobs submitted and not yet running."""
        return self._queue.qsize() + len(self._waiting)

    @property
    def running(self) -> int:
        """Jobs being decoded now (a cancelled one counts until its run lets go of it)."""
        return sum(1 for run in list(self._runs) for job in run.jobs if not job.finished)

    def submit(self, *jobs: Job) -> None:
        """Queue jobs (a request's n choices together, so they can share a batch), all or none."""
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self.pending + len(jobs) > self.max_pending:
            raise EngineBusy(f"the server is busy ({self.max_running} requests running, {self.max_pending} "
                             "waiting); retry later")
        for job in jobs:
            self._queue.put(job)

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- worker side ----------------------------------------------------------------------------------------
    def token_strings(self, ids: list[int]) -> list[str]:
        if self.tokenizer is None:
            return [str(i) for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def advance(self, job: Job, new: list[int], commit: Callable[[str], Commit]) -> None:
        """Append `new` to the job's returned ids, emit the event `commit` builds around the text that is now safe
        to send (not a possible start of a stop string, not a cut UTF-8 sequence), and stop the job if a stop
        string appeared."""
        if job.text is None:
            job.text = self._text(job)
        job.emit(commit(job.text.push(new)))
        if job.text.stopped:
            self.finish(job, "stop")

    def text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def _text(self, job: Job) -> IncrementalText:
        if not job.markup or self.tokenizer is None:
            return IncrementalText(self.text_of, job.stop)
        gen = job.request.gen
        hidden = {*gen.eos_ids, *([gen.pad_token_id] if gen.pad_token_id is not None else [])}
        return IncrementalText(lambda ids: self.tokenizer.decode([i for i in ids if i not in hidden],
                                                                 skip_special_tokens=False), job.stop)

    def finish(self, job: Job, reason: str) -> None:
        if job.finished:
            return
        job.finished = True
        if job.text is None:
            job.text = self._text(job)
        rest = job.text.flush()
        if rest:
            job.emit(Text(rest))  # held-back text, no new tokens
        forwards = sum(job.steps)
        # float32 like GenerationResult.tokens_per_forward
        tpf = (torch.tensor(len(job.ids)) / forwards).item() if forwards else 0.0
        job.emit(Done(reason, job.text.text, list(job.ids), len(job.request.prompt_ids), forwards, tpf,
                      list(job.steps), job.seed, job.decoder, job.token_logprobs[:len(job.ids)],
                      job.cached_tokens))

    @staticmethod
    def fail(job: Job, message: str, status: int = 500, code: str | None = None) -> None:
        job.finished = True
        job.emit(Error(message, status, code))

    def _expire(self, now: float) -> None:
        """Stop every job past its deadline, waiting or running."""
        for job in [j for j in self._waiting if j.deadline is not None and now > j.deadline]:
            self._waiting.remove(job)
            self.fail(job, "the request ran past the server's time limit", 408, "deadline_exceeded")
        for run in self._runs:
            for job in run.live:
                if job.deadline is not None and now > job.deadline:
                    self.fail(job, "the request ran past the server's time limit", 408, "deadline_exceeded")

    def _admit(self, block: bool) -> bool:
        """Move queued jobs into runs (batching equal settings) while fewer than max_running run. False when the
        engine is shutting down."""
        try:
            item = self._queue.get(block=block and not self._waiting, timeout=0.5 if block else None)
            while True:
                if item is None:
                    return False
                if not item.cancelled.is_set():
                    self._waiting.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        self._expire(time.monotonic())
        room = self.max_running - self.running
        admitted: list[Job] = []
        while self._waiting and len(admitted) < room:
            job = self._waiting.popleft()
            if not job.cancelled.is_set():
                admitted.append(job)
        groups: dict[tuple, list[Job]] = {}
        for job in admitted:
            if job.decoder == "autoregressive":
                self._start(_ARRun, [job])
                continue
            key = job.request.key
            group = groups.setdefault(key, [])
            group.append(job)
            if len(group) == self.max_batch:
                self._start(_DiffusionRun, groups.pop(key))
        for group in groups.values():
            self._start(_DiffusionRun, group)
        return True

    def _start(self, kind, jobs: list[Job]) -> None:
        try:
            self._runs.append(kind(self, jobs))
            self.runs_started += 1
            self.largest_batch = max(self.largest_batch, len(jobs))
        except Exception as e:  # settings were checked on submit; this is an engine fault
            log.exception("could not start a run")
            for job in jobs:
                self.fail(job, f"{type(e).__name__}: {e}")

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._admit(block=not self._runs):
                break
            for run in list(self._runs):
                try:
                    alive = run.step()
                except Exception as e:
                    log.exception("generation failed")
                    alive = False
                    for job in run.live:
                        self.fail(job, f"{type(e).__name__}: {e}")
                if not alive:
                    self._runs.remove(run)
        for job in [*self._waiting, *(j for run in self._runs for j in run.live)]:
            self.fail(job, "the server is shutting down", 503, "shutting_down")
