"""dgemma: run, serve, inspect and fine-tune DiffusionGemma block-diffusion language models."""

from .checkpoint.load import load_model
from .errors import CheckpointError
from .config import ConfigError, GenerationConfig, ModelConfig
from .generate import Commit, Done, Draft, GenerationResult, generate, stream
from .images import ImageError, Prompt, chat_prompt, preprocess_images, text_prompt
from .model import DiffusionGemma
from .pipeline import Pipeline
from .prefix_cache import PrefixCache

__all__ = [
    "load_model", "CheckpointError", "ConfigError", "GenerationConfig", "ModelConfig", "DiffusionGemma", "Pipeline",
    "generate", "stream", "GenerationResult", "Draft", "Commit", "Done", "preprocess_images", "ImageError",
    "chat_prompt", "text_prompt", "Prompt", "PrefixCache",
]
__version__ = "0.1.0"
