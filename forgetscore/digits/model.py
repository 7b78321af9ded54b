"""The tiny text-to-image model: CLIP text encoder + pixel-space conditional UNet + DDPM.

Why these choices
-----------------
* Pixel space, 1 channel, native 8x8: no VAE (nothing to gain on 8x8 images) and
  the smallest input that holds the digits, so a training step is cheap.
* Sized so that retraining from scratch takes well under a minute on one CPU core,
  which a leave-K-out evaluation does hundreds of times: ``UNet2DConditionModel``
  with two levels, 16 and 32 channels, one ResNet layer per block, no mid block, and
  cross-attention only at the 4x4 level (down block 2, up block 1); 188k weights.
  A step is dominated by the convolutions, not Python overhead: 32/64 channels with
  a mid block cost twice as much per step, and measured on one core with other jobs
  running, the mid block alone cost 20 % of a step for slightly worse samples (93 %
  vs 89.5 % of samples classified as the prompted digit after the same 684 updates).
  Attention at 8x8 (64 tokens) cost about twice as much per step for no visible gain.
  The model still has the ``attn2.to_k`` / ``attn2.to_v`` cross-attention weights the
  attribution method unlearns (6 tensors, see :func:`cross_attention_kv_names`).
* ``CLIPTextModel`` (1 layer, width 32, 16 positions) from random init, trained
  jointly with the UNet: the vocabulary is tiny, so a small encoder learns it
  quickly, and joint training lets the attribute words get distinct embeddings.
* ``DDPMScheduler`` with 1000 training steps and epsilon prediction, the setting
  of the paper.  The cosine ("squaredcos_cap_v2") beta schedule: for 8x8 images
  the linear schedule spends most timesteps at noise levels where nothing of the
  image is left.
* Saved in diffusers' ``save_pretrained`` layout (``tokenizer/``, ``text_encoder/``,
  ``unet/``, ``scheduler/``) plus ``forgetscore.json`` with the recipe, so any
  tool that loads diffusers components can load it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..attribution.io import write_dir
from ..attribution.model import quiet_loading

from .tokenizer import MAX_LENGTH, build_tokenizer

MODEL_FILE = "forgetscore.json"
FORMAT = "forgetscore-digits-v1"


@dataclass(frozen=True)
class ModelConfig:
    resolution: int = 8
    block_out_channels: tuple[int, ...] = (16, 32)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    layers_per_block: int = 1
    mid_block_type: str | None = None
    attention_head_dim: int = 8
    norm_num_groups: int = 4
    text_width: int = 32
    text_layers: int = 1
    text_heads: int = 4
    text_intermediate: int = 64
    max_length: int = MAX_LENGTH
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class DigitsModel:
    """The four components plus the metadata stored in ``forgetscore.json``."""

    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    config: ModelConfig = field(default_factory=ModelConfig)
    info: dict = field(default_factory=dict)

    def eval(self) -> "DigitsModel":
        self.text_encoder.eval()
        self.unet.eval()
        return self

    def save(self, path: str | os.PathLike) -> Path:
        return save_model(self, path)


# How the digits model is sampled (queries, the demo, the accuracy check): DDIM, 25 steps,
# classifier-free guidance 1.5.  This small model's unconditional branch is weak and strong
# guidance overshoots: on the default model, 200 samples each, guidance 1 / 1.5 / 2 / 3 drew
# the prompted digit 72 / 87 / 90 / 71 % of the time, and 50 steps were no better than 25
# (82 %).  Which 20 noises are used moves the figure by several points (81.5-92 % at 1.5).
SAMPLE_STEPS = 25
SAMPLE_GUIDANCE = 1.5


def make_scheduler(config: ModelConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=True, clip_sample_range=1.0)


def build_model(config: ModelConfig = ModelConfig(), init_seed: int = 0) -> DigitsModel:
    """Fresh components; weights drawn from torch's generator seeded with ``init_seed``.

    The global RNG state outside this call is left untouched.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_tokenizer(max_length=config.max_length)
    text_cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=config.text_width,
                              intermediate_size=config.text_intermediate, num_hidden_layers=config.text_layers,
                              num_attention_heads=config.text_heads, max_position_embeddings=config.max_length,
                              projection_dim=config.text_width, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        text_encoder = CLIPTextModel(text_cfg)
        unet = UNet2DConditionModel(
            sample_size=config.resolution, in_channels=1, out_channels=1,
            block_out_channels=config.block_out_channels, down_block_types=config.down_block_types,
            up_block_types=config.up_block_types, layers_per_block=config.layers_per_block,
            cross_attention_dim=config.text_width, attention_head_dim=config.attention_head_dim,
            norm_num_groups=config.norm_num_groups, mid_block_type=config.mid_block_type)
    return DigitsModel(tok, text_encoder, unet, make_scheduler(config), config, {"format": FORMAT})


def cross_attention_kv_names(unet: torch.nn.Module) -> list[str]:
    """Parameter names of every ``attn2.to_k`` / ``attn2.to_v`` weight, in module order."""
    return [n for n, _ in unet.named_parameters()
            if ".attn2.to_k." in n or ".attn2.to_v." in n]


def save_model(model: DigitsModel, path: str | os.PathLike) -> Path:
    """Write the model directory atomically (temp dir, then rename); returns it."""
    def fill(tmp: Path) -> None:
        with quiet_loading():  # saving a text encoder draws a progress bar otherwise
            model.tokenizer.save_pretrained(tmp / "tokenizer")
            model.text_encoder.save_pretrained(tmp / "text_encoder")
            model.unet.save_pretrained(tmp / "unet")
            model.scheduler.save_pretrained(tmp / "scheduler")
        info = dict(model.info)
        info["format"] = FORMAT
        info["model_config"] = model.config.to_dict()
        (tmp / MODEL_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    return write_dir(Path(path), fill)


def is_model_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return all((p / s).is_dir() for s in ("tokenizer", "text_encoder", "unet", "scheduler"))


def load_model(path: str | os.PathLike) -> DigitsModel:
    """Load a model directory written by :func:`save_model` (offline; eval mode)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    p = Path(path)
    if not is_model_dir(p):
        raise FileNotFoundError(f"not a model directory (needs tokenizer/, text_encoder/, unet/, scheduler/): {p}")
    info = json.loads((p / MODEL_FILE).read_text()) if (p / MODEL_FILE).exists() else {}
    config = ModelConfig.from_dict(info.get("model_config", {}))
    with quiet_loading():
        tok = PreTrainedTokenizerFast.from_pretrained(p / "tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(p / "text_encoder")
        unet = UNet2DConditionModel.from_pretrained(p / "unet")
        scheduler = DDPMScheduler.from_pretrained(p / "scheduler")
    return DigitsModel(tok, text_encoder, unet, scheduler, config, info).eval()
