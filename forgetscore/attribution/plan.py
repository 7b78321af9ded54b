"""The scoring plan: the fixed set of (caption, timestep, flip, noise) draws every image is scored on.

Scores are differences of two small losses, so both must see exactly the same draws.
The noise of a draw is keyed on (seed, image id, draw id) with the counter-based
generator, so it does not depend on batching, order, subsets or sharding.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

CAPTION_CHOICES = ("all", "first")
MAX_CAPTIONS = 2 ** 15
MAX_TIMESTEP = 2 ** 16


@dataclass(frozen=True)
class ScoringPlan:
    """Which draws score an image.

    timesteps: the diffusion timesteps (the paper: stride 50 for MSCOCO, 100 for Stable Diffusion).
    captions: ``"all"`` captions of an image (the paper) or only the ``"first"``.
    flips: also score the horizontal flip (the paper, for models trained with flip augmentation).
    seed: keys the noise of every draw.
    """

    timesteps: tuple[int, ...] = tuple(range(0, 1000, 50))
    captions: str = "all"
    flips: bool = True
    seed: int = 0
    version: int = field(default=1, repr=False)

    def __post_init__(self) -> None:
        ts = tuple(int(t) for t in self.timesteps)
        if not ts or any(not 0 <= t < MAX_TIMESTEP for t in ts) or len(set(ts)) != len(ts):
            raise ValueError(f"timesteps: need distinct integers in [0, {MAX_TIMESTEP}), got {self.timesteps!r}; "
                             "use e.g. ScoringPlan.with_stride(50)")
        object.__setattr__(self, "timesteps", ts)
        if self.captions not in CAPTION_CHOICES:
            raise ValueError(f"captions: {self.captions!r} is not one of {list(CAPTION_CHOICES)}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed: {self.seed!r} must be an int in [0, 2**63)")

    @classmethod
    def with_stride(cls, stride: int = 50, num_train_timesteps: int = 1000, **kw) -> "ScoringPlan":
        if not isinstance(stride, int) or not 0 < stride <= num_train_timesteps:
            raise ValueError(f"stride: {stride!r} must be an int in [1, {num_train_timesteps}]")
        return cls(timesteps=tuple(range(0, num_train_timesteps, stride)), **kw)

    @property
    def versions(self) -> int:
        return 2 if self.flips else 1

    def check_model(self, num_train_timesteps: int) -> None:
        if max(self.timesteps) >= num_train_timesteps:
            raise ValueError(f"timesteps: {max(self.timesteps)} is beyond the model's {num_train_timesteps} "
                             "train timesteps; use a smaller stride or list")

    @staticmethod
    def draw_id(version: int, caption: int, timestep: int) -> int:
        """The noise stream of one (flip, caption, timestep) draw of an image."""
        return (version << 31) | (caption << 16) | timestep

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ScoringPlan":
        d = dict(d)
        d["timesteps"] = tuple(d["timesteps"])
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
