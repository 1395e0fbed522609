"""CLIP-FH's own CLIP package: OpenAI-compatible API (available_models, load, tokenize) plus
what fine-tuning needs (input sizes, overlapping patches, intermediate features, random weights)."""
from . import model
from .clip import *  # noqa: F401,F403
from .clip import __all__ as _clip_all
from .model import build_model

__all__ = list(_clip_all) + ["build_model", "model"]
