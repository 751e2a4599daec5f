"""Models: each a small class over pure numpy functions (see base.Model)."""

from __future__ import annotations

from psctl.models.base import Model, model_class
from psctl.models.linreg import LinReg
from psctl.models.logreg import LogReg
from psctl.models.mf import MF
from psctl.models.softmax import Softmax
from psctl.models.svm import SVM

MODELS: dict[str, type[Model]] = {m.kind: m for m in (LogReg, Softmax, SVM, LinReg, MF)}

__all__ = ["MODELS", "Model", "model_class"]
