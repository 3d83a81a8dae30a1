"""OpenAI-compatible HTTP server with live canvas streaming and a visualizer page (`dgemma serve`)."""

from .app import Limits, create_app
from .engine import Engine, Job

__all__ = ["Engine", "Job", "Limits", "create_app"]
