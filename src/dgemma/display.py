"""Terminal view of a denoising canvas (rich): accepted positions in green, re-noised ones dimmed, with entropy
shown as brightness and the committed text above."""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.text import Text

from .generate import Commit, Draft


def token_label(tok, token_id: int) -> str:
    if tok is None:
        return str(token_id)
    s = tok.decode([token_id], skip_special_tokens=False)
    return "".join(ch if ch.isprintable() else "·" for ch in s) or "·"


class LiveView:
    """A rich Live region redrawn by the subclass (no auto refresh: one redraw per denoising step)."""

    def __init__(self, console: Console | None = None):
        self.live = Live(console=console or Console(), auto_refresh=False, transient=False)

    def __enter__(self):
        self.live.__enter__()
        return self

    def __exit__(self, *exc):
        self.live.__exit__(*exc)
        return False


class CanvasView(LiveView):
    """A live panel: the committed text, and below it the current canvas (redrawn after every step)."""

    def __init__(self, tokenizer, console: Console | None = None):
        super().__init__(console)
        self.ids: list[int] = []
        self.tok = tokenizer
        self.committed = ""

    def _render(self, title: str, body: Text) -> Panel:
        done = Text(self.committed[-600:], style="bold")
        return Panel(Group(done, Text(""), body), title=title, subtitle="green: accepted  dim: re-noised")

    def draft(self, ev: Draft) -> None:
        body = Text()
        for pos in range(ev.canvas.shape[1]):
            tid = int(ev.canvas[0, pos])
            h = float(ev.entropy[0, pos])
            if ev.accepted[0, pos]:
                style = "bold green" if h < 0.5 else "green"
            else:
                style = "dim red" if h > 2.0 else "red"
            body.append(token_label(self.tok, tid), style=style)
            body.append(" " if self.tok is None else "")
        n_acc = int(ev.accepted[0].sum())
        title = f"canvas {ev.canvas_index + 1} · step {ev.step} · accepted {n_acc}/{ev.canvas.shape[1]}"
        self.live.update(self._render(title, body), refresh=True)

    def commit(self, ev: Commit) -> None:
        ids = [int(t) for t in ev.ids[0]]
        self.ids += ids
        if self.tok is not None:
            self.committed = self.tok.decode(self.ids)
        else:
            self.committed += " ".join(map(str, ids)) + " "
        title = f"canvas {ev.canvas_index + 1} committed after {ev.steps[0]} steps"
        self.live.update(self._render(title, Text("")), refresh=True)
