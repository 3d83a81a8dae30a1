"""OpenAI-compatible HTTP server with live canvas streaming and a visualizer page (`dgemma serve`)."""

from .app import Limits, create_app
from .engine import Engine, Job
from .server import ConnectionLimits, make_server

__all__ = ["ConnectionLimits", "Engine", "Job", "Limits", "create_app", "make_server"]
