"""The serving engine: one worker thread owns the model; requests become jobs on a queue.

Jobs that arrive together with the same settings share one batched diffusion run (fast mode makes every row's
arithmetic independent of its neighbours, so a seeded request gives the same tokens alone or under load). Runs are
advanced one forward pass at a time, round-robin, so a long request never blocks a short one and a diffusion
decode and an autoregressive decode of the same prompt race pass for pass.
"""

from __future__ import annotations

import abc
import logging
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ar import ar_stream
from ..generate import Commit, Done, Draft, _plan, resolve_settings, stream

log = logging.getLogger(__name__)

DECODERS = ("diffusion", "autoregressive")


@dataclass
class Job:
    """One request. `emit` receives event dicts from the worker thread (it must be thread-safe)."""

    prompt_ids: list[int]
    max_new_tokens: int
    settings: dict[str, Any]  # generation_config overrides (already validated)
    emit: Callable[[dict[str, Any]], None]
    seed: int = field(default_factory=lambda: secrets.randbits(62))
    decoder: str = "diffusion"
    drafts: bool = False
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # Progress, owned by the worker.
    ids: list[int] = field(default_factory=list)
    sent: str = ""  # text already emitted
    steps: list[int] = field(default_factory=list)  # denoising passes per canvas (AR: one per token)
    finished: bool = False

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch."""
        return (self.decoder, self.max_new_tokens, tuple(sorted(self.settings.items())))


class _Run(abc.ABC):
    """A generator of events for some jobs; `step()` advances it by one forward pass."""

    def __init__(self, engine: Engine, jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.events: Iterator = iter(())

    @property
    def live(self) -> list[Job]:
        return [j for j in self.jobs if not j.finished and not j.cancelled.is_set()]

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
        self.pad = engine.settings_for(first).pad_token_id
        self.events = stream(engine.model, [j.prompt_ids for j in jobs], max_new_tokens=first.max_new_tokens,
                             seed=[j.seed for j in jobs], rng="fast", **first.settings)

    def handle(self, event) -> None:
        eng = self.engine
        if isinstance(event, Draft):
            for b, job in enumerate(self.jobs):
                if job.drafts and not job.finished and not job.cancelled.is_set():
                    ids = event.argmax[b].tolist()
                    job.emit({"type": "draft", "canvas_index": event.canvas_index, "step": event.step,
                              "ids": ids, "tokens": eng.token_strings(ids),
                              "accepted": event.accepted[b].tolist(),
                              "entropy": [round(x, 4) for x in event.entropy[b].tolist()],
                              "finished": bool(event.finished[b])})
        elif isinstance(event, Commit):
            for b, job in enumerate(self.jobs):
                if job.finished or job.cancelled.is_set() or event.steps[b] == 0:
                    continue
                row = event.ids[b].tolist()
                new = [t for t in row if t != self.pad] if self.pad is not None else row
                job.ids.extend(new)
                job.steps.append(event.steps[b])
                info = {"canvas_index": event.canvas_index, "ids": row, "tokens": eng.token_strings(row),
                        "steps": event.steps[b]}
                eng.advance(job, info)
                if not job.finished and bool(event.finished[b]):
                    eng.finish(job, "stop")
        elif isinstance(event, Done):
            for job in self.live:
                eng.finish(job, "length")


class _ARRun(_Run):
    def __init__(self, engine: Engine, jobs: list[Job]):
        super().__init__(engine, jobs)
        (job,) = jobs
        eos = engine.settings_for(job).eos_token_id
        self.eos = set(engine.settings_for(job).eos_ids)
        self.events = ar_stream(engine.model, job.prompt_ids, job.max_new_tokens, eos_token_id=eos, seed=job.seed)

    def handle(self, token: int) -> None:
        (job,) = self.jobs
        job.ids.append(token)
        job.steps.append(1)
        self.engine.advance(job, {"forwards": len(job.steps), "ids": [token],
                                  "tokens": self.engine.token_strings([token])})
        if not job.finished and token in self.eos:
            self.engine.finish(job, "stop")


class Engine:
    """Owns the model and its worker thread. `submit` is thread-safe; events go to each job's `emit`."""

    def __init__(self, model, max_batch: int = 8, max_pending: int = 256):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch = max_batch
        self.max_pending = max_pending
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._runs: list[_Run] = []
        self._closed = False
        self.forward_passes = 0  # run steps taken (one forward pass each, batched rows counted once)
        self.runs_started = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="dgemma-engine", daemon=True)
        self._thread.start()

    # -- called from request handlers ------------------------------------------------------------------------
    def settings_for(self, job: Job):
        return resolve_settings(self.model, job.max_new_tokens, job.settings)

    def check(self, job: Job) -> None:
        """Raise ValueError naming the problem if `job` cannot run (bad settings, too long for the model)."""
        if job.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {job.decoder!r}")
        gen = self.settings_for(job)
        if job.decoder == "diffusion":
            _plan(self.model.config, gen, len(job.prompt_ids))
        elif len(job.prompt_ids) + job.max_new_tokens > self.model.config.max_position_embeddings:
            raise ValueError(f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_new_tokens}) exceeds "
                             f"the model's {self.model.config.max_position_embeddings} positions")

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        if self._closed:
            raise RuntimeError("the engine is shut down")
        if self._queue.qsize() >= self.max_pending:
            raise OverflowError(f"too many pending requests ({self.max_pending}); retry later")
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
        safe = len(text)
        for s in job.stop:  # hold back a tail that may grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        self._emit_delta(job, text[:safe], info)

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

    def _admit(self, block: bool) -> bool:
        """Move queued jobs into runs (batching equal settings). False when the engine is shutting down."""
        jobs: list[Job] = []
        try:
            item = self._queue.get(block=block)
            while True:
                if item is None:
                    return False
                jobs.append(item)
                item = self._queue.get_nowait()
        except queue.Empty:
            pass
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.cancelled.is_set():
                continue
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
                job.finished = True
                job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})

    def _work(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            if not self._admit(block=not self._runs):
                break
            for run in list(self._runs):
                try:
                    alive = run.step()
                    self.forward_passes += 1
                except Exception as e:
                    log.exception("generation failed")
                    alive = False
                    for job in run.live:
                        job.finished = True
                        job.emit({"type": "error", "message": f"{type(e).__name__}: {e}"})
                if not alive:
                    self._runs.remove(run)
        for run in self._runs:
            for job in run.live:
                job.finished = True
                job.emit({"type": "error", "message": "the server is shutting down"})
