"""The attribution engine: prepare, Fisher, unlearning, scoring, results.

The public surface: :class:`Attributor` (the whole method), :class:`ScoringPlan`,
:class:`UnlearnConfig` and the building blocks other attribution code can reuse —
:class:`LossSweep` (per-sample losses of a batch under a plan), :func:`compute_fisher`
(the diagonal Fisher of selected weights) and :func:`unlearn` (the Newton step).
"""
from .attributor import Attributor, load_fisher
from .data import PreparedData, TrainingSet, prepare
from .fisher import compute_fisher
from .generate import generate
from .losses import LossSweep
from .model import DiffusionModel
from .params import PRESETS as WEIGHT_PRESETS
from .params import select as select_weights
from .plan import ScoringPlan
from .results import Attribution
from .unlearning import PRESETS as UNLEARN_PRESETS
from .unlearning import UnlearnConfig, preset, unlearn

__all__ = ["Attributor", "Attribution", "DiffusionModel", "TrainingSet", "PreparedData", "ScoringPlan",
           "UnlearnConfig", "LossSweep", "compute_fisher", "unlearn", "generate", "prepare", "preset",
           "select_weights", "load_fisher", "WEIGHT_PRESETS", "UNLEARN_PRESETS"]
