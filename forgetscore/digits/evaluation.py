"""The digits model as an evaluation subject: its retraining function, queries, labels and features."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DIGIT_WORDS
from .train import TrainRecipe

# Thirty query prompts, three per digit, with the attribute words spread over them; an evaluation
# takes the first Q (the leave-K-out default: ten, one per digit).  Query i is generated with seed i,
# and earlier entries never change, so a run with more queries reuses a smaller run's work.
QUERY_PROMPTS = (
    "a thick right slanted wide handwritten seven",
    "a thin upright narrow handwritten one",
    "a regular left slanted medium handwritten two",
    "a thick upright wide handwritten zero",
    "a thin right slanted medium handwritten three",
    "a thick left slanted narrow handwritten four",
    "a regular upright wide handwritten five",
    "a thin left slanted wide handwritten six",
    "a thick upright narrow handwritten eight",
    "a regular right slanted narrow handwritten nine",
    "a thick left slanted wide handwritten two",
    "a thin left slanted medium handwritten three",
    "a thin upright wide handwritten one",
    "a thin upright narrow handwritten zero",
    "a regular left slanted wide handwritten eight",
    "a regular right slanted narrow handwritten seven",
    "a thin right slanted medium handwritten six",
    "a regular upright narrow handwritten five",
    "a regular right slanted wide handwritten four",
    "a thin upright narrow handwritten nine",
    "a thin upright wide handwritten four",
    "a thick right slanted narrow handwritten six",
    "a thick right slanted medium handwritten seven",
    "a thin left slanted wide handwritten two",
    "a thin upright medium handwritten eight",
    "a thick left slanted medium handwritten one",
    "a thick left slanted medium handwritten five",
    "a regular upright wide handwritten zero",
    "a thin upright medium handwritten three",
    "a thin upright medium handwritten nine",
)


def prompt_label(prompt: str) -> int:
    """The digit a prompt names (its last word)."""
    word = prompt.split()[-1]
    if word not in DIGIT_WORDS:
        raise ValueError(f"prompt: {prompt!r} does not end with a digit word ({', '.join(DIGIT_WORDS)})")
    return DIGIT_WORDS.index(word)


@dataclass(frozen=True)
class DigitsTrainer:
    """``train_fn`` for the evaluation: retrain the digits model with one recipe (picklable)."""

    recipe: "str | TrainRecipe" = "default"

    def __call__(self, exclude_ids: Sequence[int], out_dir: Path, coupled: bool = True) -> None:
        from .train import train

        train(self.recipe, out_dir=out_dir, exclude_ids=exclude_ids, coupled=coupled)


def labels() -> np.ndarray:
    from .data import load_data

    return load_data().labels.numpy()


def features(pixels) -> np.ndarray:
    """Hidden features of the digit classifier (trained on the training set): the image embedding."""
    from .classifier import get_classifier

    return get_classifier(pixels.shape[-1]).features(pixels)
