"""OpenAI-compatible HTTP server with live canvas streaming and a visualizer page (`dgemma serve`)."""

from ..limits import ConnectionLimits, Limits
from .app import create_app
from .engine import Engine, Job
from .server import make_server

__all__ = ["ConnectionLimits", "Engine", "Job", "Limits", "create_app", "make_server"]
