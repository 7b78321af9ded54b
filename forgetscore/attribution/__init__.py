"""The attribution engine: prepare, Fisher, unlearning, scoring, results.

The public surface: :class:`Attributor` (the whole method), :class:`ScoringPlan`,
:class:`UnlearnConfig` and the building blocks other attribution code can reuse —
:class:`LossSweep` (per-sample losses of a batch under a plan) with :func:`run_sweep` (the
same in resumable chunks shared by torchrun ranks), :func:`compute_fisher` (the diagonal
Fisher of selected weights) with :func:`run_fisher` (likewise in chunks) and :func:`unlearn`
(the Newton step).
"""
from .attributor import Attributor, load_fisher
from .data import PreparedData, TrainingSet, prepare
from .fisher import compute_fisher, run_fisher
from .generate import generate
from .losses import LossSweep
from .model import DiffusionModel
from .params import PRESETS as WEIGHT_PRESETS
from .params import select as select_weights
from .plan import ScoringPlan
from .results import Attribution
from .sweep import run_sweep
from .unlearning import PRESETS as UNLEARN_PRESETS
from .unlearning import UnlearnConfig, preset, unlearn

__all__ = ["Attributor", "Attribution", "DiffusionModel", "TrainingSet", "PreparedData", "ScoringPlan",
           "UnlearnConfig", "LossSweep", "run_sweep", "compute_fisher", "run_fisher", "unlearn", "generate", "prepare", "preset",
           "select_weights", "load_fisher", "WEIGHT_PRESETS", "UNLEARN_PRESETS"]
