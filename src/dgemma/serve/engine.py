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
import math
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ar import ar_stream
from ..config import GenerationConfig
from ..generate import Commit, Done, Draft, plan_canvases, resolve_settings, stream
from ..tokenizer import stable_prefix

log = logging.getLogger(__name__)

DECODERS = ("diffusion", "autoregressive")


class EngineBusy(Exception):
    """The engine's queue is full; the client should retry later."""


@dataclass
class Job:
    """One request. `emit` receives event dicts from the worker thread (it must be thread-safe).

    `max_new_tokens` is a hard cap on the returned tokens: diffusion runs whole canvases and the job keeps at most
    this many of their tokens (finish reason "length" when it cut)."""

    prompt_ids: list[int]
    max_new_tokens: int
    settings: dict[str, Any]  # the request's generation_config overrides (validated by the request schema)
    emit: Callable[[dict[str, Any]], None]
    seed: int = field(default_factory=lambda: secrets.randbits(62))
    decoder: str = "diffusion"
    drafts: bool = False
    stop: list[str] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() after which the job is stopped
    constraint: Any = None  # a constraints.Constraint the output must satisfy (diffusion only)
    images: dict[str, Any] | None = None  # preprocess_images output for the prompt's images (diffusion only)
    cancelled: threading.Event = field(default_factory=threading.Event)
    gen: GenerationConfig | None = None  # the settings resolved against the model, once (Engine.settings_for)
    # Progress, owned by the worker.
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    steps: list[int] = field(default_factory=list)  # denoising passes per canvas (AR: one per token)
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def active(self) -> bool:
        return not self.finished and not self.cancelled.is_set()

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch. A job with images runs alone: the vision tower's batched
        arithmetic is not row-invariant, and a seeded request must give the same tokens alone or under load."""
        solo = id(self) if self.images is not None else None
        return (self.decoder, self.max_new_tokens, tuple(sorted(self.settings.items())), solo)


def finite_or_none(values: list[float], digits: int = 4) -> list[float | None]:
    """Rounded floats for JSON, with None where a value is not finite (NaN is not JSON)."""
    return [round(x, digits) if math.isfinite(x) else None for x in values]


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
        first = jobs[0]
        gen = engine.settings_for(first)
        self.pad, self.eos = gen.pad_token_id, set(gen.eos_ids)
        constraints = [j.constraint for j in jobs]
        self.events = stream(engine.model, [j.prompt_ids for j in jobs], settings=gen,
                             seed=[j.seed for j in jobs], rng="fast",
                             constraint=constraints if any(c is not None for c in constraints) else None,
                             **self._image_inputs(jobs))

    @staticmethod
    def _image_inputs(jobs: list[Job]) -> dict[str, Any]:
        """The batch's images in prompt order, row by row (what generate expects)."""
        with_images = [j.images for j in jobs if j.images is not None]
        if not with_images:
            return {}
        return {"pixel_values": torch.cat([i["pixel_values"] for i in with_images]),
                "image_position_ids": torch.cat([i["image_position_ids"] for i in with_images])}

    def handle(self, event) -> None:
        eng = self.engine
        if isinstance(event, Draft):
            eng.forward_passes += 1  # one decoder pass for the whole batch
            for b, job in enumerate(self.jobs):
                if job.drafts and job.active:
                    ids = event.argmax[b].tolist()
                    job.emit({"type": "draft", "canvas_index": event.canvas_index, "step": event.step,
                              "ids": ids, "tokens": eng.token_strings(ids),
                              "accepted": event.accepted[b].tolist(),
                              "entropy": finite_or_none(event.entropy[b].tolist()),
                              "finished": bool(event.finished[b])})
        elif isinstance(event, Commit):
            for b, job in enumerate(self.jobs):
                if job.active and event.steps[b] > 0:
                    self._commit(job, event.ids[b].tolist(), event.steps[b], event.canvas_index,
                                 bool(event.finished[b]))
        elif isinstance(event, Done):
            for job in self.live:
                eng.finish(job, "length")

    def _commit(self, job: Job, row: list[int], steps: int, canvas_index: int, row_finished: bool) -> None:
        new = [t for t in row if t != self.pad] if self.pad is not None else row
        room = job.max_new_tokens - len(job.ids)
        kept = new[:room]  # whole canvases were generated; the client gets at most max_tokens of them
        job.ids.extend(kept)
        job.steps.append(steps)
        info = {"canvas_index": canvas_index, "ids": row, "tokens": self.engine.token_strings(row), "steps": steps}
        self.engine.advance(job, info)
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
        gen = engine.settings_for(job)
        self.eos = set(gen.eos_ids)
        self.events = ar_stream(engine.model, job.prompt_ids, job.max_new_tokens, eos_token_id=gen.eos_token_id,
                                seed=job.seed)

    def handle(self, token: int) -> None:
        (job,) = self.jobs
        self.engine.forward_passes += 1
        job.ids.append(token)
        job.steps.append(1)
        self.engine.advance(job, {"forwards": len(job.steps), "ids": [token],
                                  "tokens": self.engine.token_strings([token])})
        if not job.finished and token in self.eos:
            self.engine.finish(job, "stop")


class Engine:
    """Owns the model and its worker thread. `submit` is thread-safe; events go to each job's `emit`.

    max_running: jobs decoded at once (rows of all runs); max_pending: jobs waiting beyond those."""

    def __init__(self, model, max_batch: int = 8, max_pending: int = 64, max_running: int = 16):
        self.model = model
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
    def settings_for(self, job: Job) -> GenerationConfig:
        """The job's settings over the model's generation_config, resolved once and kept on the job."""
        if job.gen is None:
            job.gen = resolve_settings(self.model, job.max_new_tokens, job.settings)
        return job.gen

    def check(self, job: Job) -> None:
        """Raise ValueError naming the problem if `job` cannot run (bad settings, too long for the model)."""
        if job.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {job.decoder!r}")
        gen = self.settings_for(job)
        if job.decoder == "diffusion":
            plan_canvases(self.model.config, gen, len(job.prompt_ids))
        elif len(job.prompt_ids) + job.max_new_tokens > self.model.config.max_position_embeddings:
            raise ValueError(f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_new_tokens}) exceeds "
                             f"the model's {self.model.config.max_position_embeddings} positions")

    @property
    def pending(self) -> int:
        """Jobs submitted and not yet running."""
        return self._queue.qsize() + len(self._waiting)

    @property
    def running(self) -> int:
        """Jobs being decoded now (a cancelled one counts until its run lets go of it)."""
        return sum(1 for run in list(self._runs) for job in run.jobs if not job.finished)

    def submit(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self.pending >= self.max_pending:
            raise EngineBusy(f"the server is busy ({self.max_running} requests running, {self.max_pending} "
                             "waiting); retry later")
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

    def text_of(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def advance(self, job: Job, info: dict[str, Any]) -> None:
        """New ids were appended to `job.ids`: emit the text that is now safe to send (not a possible start of a
        stop string, not a cut UTF-8 sequence) and stop the job if a stop string appeared."""
        text = self.text_of(job.ids)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            self._emit_delta(job, text[:cut], info)
            self.finish(job, "stop", text[:cut])
            return
        self._emit_delta(job, text[:stable_prefix(text, job.stop)], info)

    def _emit_delta(self, job: Job, upto: str, info: dict[str, Any]) -> None:
        delta = upto[len(job.sent):] if upto.startswith(job.sent) else ""
        job.sent = upto if upto.startswith(job.sent) else job.sent
        kind = "commit" if job.decoder == "diffusion" else "token"
        job.emit({"type": kind, "text": delta, **info})

    def finish(self, job: Job, reason: str, final_text: str | None = None) -> None:
        if job.finished:
            return
        job.finished = True
        text = self.text_of(job.ids) if final_text is None else final_text
        if text.startswith(job.sent) and len(text) > len(job.sent):
            job.emit({"type": "text", "text": text[len(job.sent):]})  # held-back text, no new tokens
            job.sent = text
        forwards = sum(job.steps)
        # float32 like GenerationResult.tokens_per_forward
        tpf = (torch.tensor(len(job.ids)) / forwards).item() if forwards else 0.0
        job.emit({"type": "done", "finish_reason": reason, "text": text, "ids": list(job.ids),
                  "prompt_tokens": len(job.prompt_ids), "completion_tokens": len(job.ids),
                  "forward_passes": forwards, "tokens_per_forward": tpf, "steps": list(job.steps),
                  "seed": job.seed, "decoder": job.decoder})

    @staticmethod
    def fail(job: Job, message: str, status: int = 500, code: str | None = None) -> None:
        job.finished = True
        job.emit({"type": "error", "message": message, "status": status, "code": code})

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
            group = groups.setdefault(job.key, [])
            group.append(job)
            if len(group) == self.max_batch:
                self._start(_DiffusionRun, groups.pop(job.key))
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
