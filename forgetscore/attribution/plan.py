"""The scoring plan: the fixed set of (caption, timestep, flip, noise) draws every image is scored on.

Scores are differences of two small losses, so both must see exactly the same draws.
Two ways to make the noise of a draw:

- ``noise="keyed"`` (the default): keyed on (seed, image id, draw id) with the
  counter-based generator, so it depends on nothing but the draw: not on batching,
  order, subsets, sharding, device or backend.
- ``noise="reference"``: the published implementation's noise, reproduced exactly.
  It walks the whole training set in data order, first every image as is and then
  (with flips) every flipped image, in batches of ``reference_batch`` of these
  items, each item expanded to its captions x timesteps rows; batch ``b`` takes
  ``torch.randn(rows, C, H, W)`` from a ``torch.Generator(noise_device)`` seeded
  ``seed + b``. A draw's noise therefore depends on ``reference_batch``, on the
  order and content of the training set (adding an image moves every later batch)
  and on the generator's device kind (torch's CPU and CUDA streams differ), as in
  the published code. Within one training set it is still a fixed function of the
  draw: scoring a subset, in any order, chunked or sharded, gives each image the
  noise of the full published pass, so cached before-losses stay valid for subsets.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

CAPTION_CHOICES = ("all", "first")
NOISE_CHOICES = ("keyed", "reference")
NOISE_DEVICES = ("cpu", "cuda")
MAX_CAPTIONS = 2 ** 15
MAX_TIMESTEP = 2 ** 16


@dataclass(frozen=True)
class ScoringPlan:
    """Which draws score an image.

    timesteps: the diffusion timesteps (the paper: stride 50 for MSCOCO, 100 for Stable Diffusion).
    captions: ``"all"`` captions of an image (the paper) or only the ``"first"``.
    flips: also score the horizontal flip (the paper, for models trained with flip augmentation).
    seed: keys the noise of every draw (with reference noise: batch ``b`` is seeded ``seed + b``).
    noise: ``"keyed"`` or ``"reference"`` (the published implementation's per-batch ``torch.randn``;
        see the module docstring for what its numbers then depend on).
    reference_batch: reference noise only: items (images or flipped images) per batch of the published
        loop, i.e. its ``--batch_size`` divided by captions x timesteps (MSCOCO: 8000 / (5 x 20) = 80).
    noise_device: reference noise only: the device kind of the generator, ``"cuda"`` (the published runs,
        the default) or ``"cpu"``; the noise is made there and moved to the model's device.
    """

    timesteps: tuple[int, ...] = tuple(range(0, 1000, 50))
    captions: str = "all"
    flips: bool = True
    seed: int = 0
    version: int = field(default=1, repr=False)
    noise: str = "keyed"
    reference_batch: int | None = None
    noise_device: str | None = None

    def __post_init__(self) -> None:
        ts = tuple(int(t) for t in self.timesteps)
        if not ts or any(not 0 <= t < MAX_TIMESTEP for t in ts) or len(set(ts)) != len(ts):
            raise ValueError(f"timesteps: need distinct integers in [0, {MAX_TIMESTEP}), got {self.timesteps!r}; "
                             "e.g. every 50th (ScoringPlan.with_stride(50); on the command line --timestep-stride 50)")
        object.__setattr__(self, "timesteps", ts)
        if self.captions not in CAPTION_CHOICES:
            raise ValueError(f"captions: {self.captions!r} is not one of {list(CAPTION_CHOICES)}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed: {self.seed!r} must be an int in [0, 2**63)")
        if self.noise not in NOISE_CHOICES:
            raise ValueError(f"noise: {self.noise!r} is not one of {list(NOISE_CHOICES)}")
        if self.noise == "reference":
            self._check_reference_noise()
        else:
            for name in ("reference_batch", "noise_device"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only used with noise='reference' (--noise reference); drop it "
                                     "or pass that")

    def _check_reference_noise(self) -> None:
        b = self.reference_batch
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise ValueError(("reference_batch: not given; noise='reference' (--noise reference) needs" if b is None
                              else f"reference_batch: {b!r} must be an int >= 1 with noise='reference':") +
                             " the images per batch of the published loop (its batch_size / (captions x timesteps);"
                             " MSCOCO: 80)")
        if self.noise_device is None:
            object.__setattr__(self, "noise_device", "cuda")
        if self.noise_device not in NOISE_DEVICES:
            raise ValueError(f"noise_device: {self.noise_device!r} is not one of {list(NOISE_DEVICES)}")

    @classmethod
    def with_stride(cls, stride: int = 50, num_train_timesteps: int = 1000, **kw) -> ScoringPlan:
        if not isinstance(stride, int) or not 0 < stride <= num_train_timesteps:
            raise ValueError(f"stride: {stride!r} must be an int in [1, {num_train_timesteps}]")
        return cls(timesteps=tuple(range(0, num_train_timesteps, stride)), **kw)

    @property
    def versions(self) -> int:
        return 2 if self.flips else 1

    def check_model(self, num_train_timesteps: int) -> None:
        if max(self.timesteps) >= num_train_timesteps:
            raise ValueError(f"timesteps: {max(self.timesteps)} is beyond the model's {num_train_timesteps} "
                             f"train timesteps; list timesteps below {num_train_timesteps}")

    @staticmethod
    def draw_id(version: int, caption: int, timestep: int) -> int:
        """The noise stream of one (flip, caption, timestep) draw of an image."""
        return (version << 31) | (caption << 16) | timestep

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timesteps"] = list(self.timesteps)
        if self.noise == "keyed":  # the dict (and every cache key made from it) of plans made before the option
            for name in ("noise", "reference_batch", "noise_device"):
                del d[name]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ScoringPlan:
        d = dict(d)
        d["timesteps"] = tuple(d["timesteps"])
        return cls(**d)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]
