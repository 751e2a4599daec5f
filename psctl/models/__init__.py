"""Models: each a small class over pure numpy functions (see base.Model), and their registry."""

from __future__ import annotations

from psctl.models.base import Model
from psctl.models.registry import MODELS, model_class

__all__ = ["MODELS", "Model", "model_class"]
