"""A diffusers text-to-image model as the engine sees it.

Loaded from a directory in diffusers' ``save_pretrained`` layout (``tokenizer/``,
``text_encoder/``, ``unet/``, ``scheduler/``, optional ``vae/``) with local paths
only, or built from in-memory components. No ``vae/`` means pixel space.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import params

SUBFOLDERS = ("tokenizer", "text_encoder", "unet", "scheduler")


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence diffusers' and transformers' loading and saving chatter (no accelerate, progress bars)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    bars = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    # Critical only: diffusers logs an "error" for a part saved as .bin rather than .safetensors, which it then
    # loads; the loading report that matters (missing or unused weights) is read back by _check_loaded.
    dlog.set_verbosity(dlog.CRITICAL)
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0])
        tlog.set_verbosity(levels[1])
        if bars[0]:
            dlog.enable_progress_bar()
        if bars[1]:
            tlog.enable_progress_bar()


@dataclass
class DiffusionModel:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    scheduler: object
    vae: torch.nn.Module | None = None
    source: str = "<in memory>"

    def __post_init__(self) -> None:
        _check_scheduler_kind(type(self.scheduler).__name__)
        kind = getattr(self.scheduler.config, "prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"scheduler: prediction_type {kind!r} is not supported; "
                             "use a model trained with 'epsilon' or 'v_prediction'")
        _check_conditioning(self.unet, self.text_encoder, self.vae)
        _check_shapes(self.unet)
        self._ids: dict[str, tuple[tuple, str]] = {}  # see _kept_id

    # --- loading -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> "DiffusionModel":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        check_device(device)  # before the slow loading
        root = Path(path)
        if not root.is_dir():
            raise ValueError(f"model: {str(root)!r} is not a directory; pass a folder saved with save_pretrained "
                             "(tokenizer/, text_encoder/, unet/, scheduler/)")
        missing = [s for s in SUBFOLDERS if not (root / s).is_dir()]
        if missing:
            raise ValueError(f"model: {str(root)!r} lacks {', '.join(s + '/' for s in missing)}; "
                             "save the pipeline with save_pretrained or pass components")
        _check_files(root)
        try:  # every scheduler config is read as DDPM's below, which would hide the class it was saved as
            saved_as = json.loads((root / "scheduler" / "scheduler_config.json").read_text()).get("_class_name")
        except (OSError, ValueError, AttributeError):
            saved_as = None  # the loader below says what is wrong with the file
        _check_scheduler_kind(saved_as)
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        loaders = {"tokenizer": AutoTokenizer, "text_encoder": CLIPTextModel, "unet": UNet2DConditionModel,
                   "scheduler": DDPMScheduler, "vae": AutoencoderKL}
        parts = {}
        with quiet_loading():
            for name, loader in loaders.items():
                if name == "vae" and not (root / name).is_dir():
                    parts[name] = None
                    continue
                weighted = name in ("text_encoder", "unet", "vae")
                try:
                    variant = {"variant": v} if (v := _weights_variant(root / name)) else {}
                    info = {"output_loading_info": True} if weighted else {}
                    parts[name] = loader.from_pretrained(root / name, local_files_only=True, **variant, **info)
                except (OSError, ValueError) as exc:
                    raise ValueError(f"model: cannot load {name}/ of {str(root)!r} ({exc}); save the pipeline "
                                     "again with save_pretrained") from None
                if weighted:
                    parts[name], info = parts[name]
                    _check_loaded(root / name, info)
        model = cls(parts["tokenizer"], parts["text_encoder"], parts["unet"], parts["scheduler"], parts["vae"],
                    source=str(root))
        return model.to(device, dtype)

    def to(self, device: str | torch.device, dtype: torch.dtype = torch.float32) -> "DiffusionModel":
        check_device(device)
        for m in (self.text_encoder, self.unet, self.vae):
            if m is not None:
                if next(m.parameters()).dtype != dtype:
                    m.to(dtype=dtype)
                m.to(device=device).eval().requires_grad_(False)
        return self

    def save(self, path: str | os.PathLike) -> None:
        root = Path(path)
        for name in ("tokenizer", "text_encoder", "unet", "scheduler", "vae"):
            part = getattr(self, name)
            if part is not None:
                part.save_pretrained(root / name)

    # --- properties ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float64)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The UNet's input (C, H, W): latents for latent models, pixels otherwise."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet.config.in_channels), int(h), int(w)

    @property
    def max_length(self) -> int:
        """The tokens a prompt is padded or cut to: the tokenizer's length, or where its config sets none (a huge
        placeholder then) the text encoder's positions."""
        length = getattr(self.tokenizer, "model_max_length", None)
        positions = getattr(getattr(self.text_encoder, "config", None), "max_position_embeddings", None)
        if isinstance(length, int) and length < 10 ** 6:
            return length
        if isinstance(positions, int):
            return positions
        raise ValueError("tokenizer: sets no model_max_length (nor the text encoder max_position_embeddings); set "
                         "model_max_length in tokenizer/tokenizer_config.json")

    @property
    def vae_scale(self) -> int:
        if self.vae is None:
            return 1
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The (C, H, W) of the pictures the model makes."""
        c, h, w = self.input_shape
        if self.vae is None:
            return c, h, w
        return int(self.vae.config.in_channels), h * self.vae_scale, w * self.vae_scale

    # --- identities ----------------------------------------------------------------------
    # Hashing every weight takes seconds for a large model, so each id is kept with a stamp of
    # what it was computed from: the cheap parts themselves and, for the modules, every weight's
    # storage and version counter, which an optimizer step, load_state_dict or `p.add_` bump.
    # Writes through `p.data` bypass the counters: call forget_ids() after them.
    def encoders_id(self) -> str:
        """What the prepared cache depends on: tokenizer, text encoder and VAE (weights and configs: a VAE's
        scaling factor or an encoder's activation changes what they make), and the size the images are read at."""
        cheap = [json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode(),
                 str(self.max_length).encode(), str(self.input_shape).encode(),
                 *(_config_bytes(m) for m in (self.text_encoder, self.vae) if m is not None)]
        return self._kept_id("encoders", cheap, [m for m in (self.text_encoder, self.vae) if m is not None])

    def unet_id(self) -> str:
        """What the before-losses depend on: the UNet's weights and config and the noise schedule."""
        cheap = [_config_bytes(self.unet), self.alphas_cumprod.cpu().numpy().tobytes(), self.prediction_type.encode()]
        return self._kept_id("unet", cheap, [self.unet])

    def _kept_id(self, key: str, cheap: list[bytes], modules: list[torch.nn.Module]) -> str:
        stamp = (tuple(cheap), tuple(_stamp(m) for m in modules))
        kept = self._ids.get(key)
        if kept is None or kept[0] != stamp:
            h = hashlib.sha256()
            for part in cheap:
                h.update(part)
            for m in modules:
                _hash_module(h, m)
            kept = self._ids[key] = (stamp, h.hexdigest()[:16])
        return kept[1]

    @contextmanager
    def swapped(self, values: dict[str, torch.Tensor] | None) -> Iterator[None]:
        """Temporarily load `values` into the UNet's named weights (None: leave it as it is).

        The weights are copied in and back in place, so CUDA graphs and compiled code keep their
        tensors; the original weights come back bit for bit, so a unet id computed before stays
        valid without hashing the UNet again.
        """
        kept = self._ids.get("unet")
        valid = kept is not None and kept[0][1] == (_stamp(self.unet),)
        try:
            with params.swapped(self.unet, values):
                yield
        finally:
            if valid:
                self._ids["unet"] = ((kept[0][0], (_stamp(self.unet),)), kept[1])

    def forget_ids(self) -> None:
        """Call after writing weights through `.data`, which no version counter sees."""
        self._ids.clear()

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` the tokenizer reads as its unknown token (none for a byte-level BPE such as CLIP's)."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if unk is None:
            return []
        words = dict.fromkeys(text.split())  # each word once, in the order of the text
        return [w for w in words if unk in self.tokenizer(w, add_special_tokens=False).input_ids]

    def cut_tokens(self, text: str) -> int:
        """How many tokens of `text` (its special tokens counted) lie beyond :attr:`max_length`: the text encoder
        never sees them (:meth:`encode_text` cuts them off)."""
        ids = self.tokenizer(text, truncation=False, verbose=False).input_ids  # verbose: no log of the length
        return max(0, len(ids) - self.max_length)

    # --- encoders ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text-encoder hidden states [len(prompts), L, D] for the UNet's cross-attention."""
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] [B, C, H, W] -> UNet inputs (VAE latent means times the scaling factor)."""
        pixels = pixels.to(self.device, next(self.unet.parameters()).dtype)
        if self.vae is None:
            return pixels
        latents = self.vae.encode(pixels).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, inputs: torch.Tensor) -> torch.Tensor:
        """UNet-space samples -> pixels in [-1, 1]."""
        if self.vae is None:
            return inputs.clamp(-1, 1)
        return self.vae.decode(inputs / self.vae.config.scaling_factor).sample.clamp(-1, 1)


# What each part's from_pretrained reads (patterns, and what to call them); the loaders' own errors for a missing
# file name the wrong one (a .bin where safetensors are expected, a tokenizer package to install).
_WEIGHTS = ("*.safetensors", "*.bin")
_PART_FILES = {
    "tokenizer": [(("tokenizer.json", "vocab.json"), "tokenizer.json (or vocab.json)")],
    "text_encoder": [(("config.json",), "config.json"), (_WEIGHTS, "weights (model.safetensors)")],
    "unet": [(("config.json",), "config.json"), (_WEIGHTS, "weights (diffusion_pytorch_model.safetensors)")],
    "scheduler": [(("scheduler_config.json",), "scheduler_config.json")],
    "vae": [(("config.json",), "config.json"), (_WEIGHTS, "weights (diffusion_pytorch_model.safetensors)")],
}


_WEIGHT_FILE = re.compile(r"^(?:model|diffusion_pytorch_model|pytorch_model)(?:\.(?P<variant>\w+))?"
                          r"\.(?:safetensors|bin)$")


def _weights_variant(folder: Path) -> str | None:
    """The variant (e.g. "fp16") of a part saved only as one (``*.fp16.safetensors``, as many downloads
    are), which its loader must be told; None for plain weights (or several variants: the loader's error)."""
    found = {m.group("variant") for p in folder.glob("*") if (m := _WEIGHT_FILE.match(p.name))}
    return next(iter(found)) if None not in found and len(found) == 1 else None


def _check_files(root: Path) -> None:
    """Every part of a saved model holds what its loader reads, checked before any part is loaded."""
    index = root / "model_index.json"
    if not (root / "vae").is_dir() and index.is_file():
        try:
            entry = json.loads(index.read_text()).get("vae")
            listed = isinstance(entry, list) and any(e is not None for e in entry)  # [null, null]: none
        except (OSError, ValueError, AttributeError):
            listed = False
        if listed:  # without it the UNet would be taken to work on pixels
            raise ValueError(f"model: {str(root)!r} lacks vae/, which its model_index.json lists; copy the "
                             "vae/ folder of the pipeline (a latent model cannot run without it)")
    for name, wanted in _PART_FILES.items():
        folder = root / name
        if name == "vae" and not folder.is_dir():
            continue
        for patterns, label in wanted:
            if not any(any(folder.glob(p)) for p in patterns):
                raise ValueError(f"model: {name}/ of {str(root)!r} has no {label}; save the pipeline again with "
                                 "save_pretrained")


def _check_loaded(folder: Path, info: dict) -> None:
    """That a part's weights file held every weight its config makes (the loaders leave a missing one random, or
    uninitialised, with a log line this package's quiet loading hides), and says which weights it did not use."""
    def shown(keys) -> str:
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing, unused = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    if missing:
        raise ValueError(f"model: {folder.name}/ of {str(folder.parent)!r} lacks weights its config needs "
                         f"({shown(missing)}): they would be random; save that part again with save_pretrained, or "
                         "convert the checkpoint to diffusers' names")
    if unused:
        warnings.warn(f"model: {folder.name}/ of {str(folder.parent)!r} holds weights its config does not use "
                      f"({shown(unused)}); they are left out, so the model runs without them", stacklevel=3)


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError saying why it cannot be used here."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device: {str(device)!r} but this PyTorch ({torch.__version__}) sees no CUDA GPU; "
                             "use cpu, or install a CUDA build of PyTorch on a machine with a GPU")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device: {str(device)!r} but there {'is' if count == 1 else 'are'} {count} CUDA "
                             f"device(s); use cuda:0 to cuda:{count - 1}")
    return dev


def _check_conditioning(unet: torch.nn.Module, text_encoder: torch.nn.Module, vae: torch.nn.Module | None) -> None:
    """That the UNet is conditioned on the text encoder's states alone, as the scoring calls it: a UNet that
    also takes pooled text and sizes (SDXL), class labels, or an image beside the latents would fail deep in
    its forward, or be scored without what it was trained with."""
    cfg = getattr(unet, "config", None)
    if cfg is None:
        return
    extra = [f"{key}={getattr(cfg, key)!r}" for key in ("addition_embed_type", "class_embed_type",
                                                        "encoder_hid_dim_type", "num_class_embeds")
             if getattr(cfg, key, None) is not None]
    if extra:
        raise ValueError(f"unet: its config sets {', '.join(extra)}: it takes conditioning beside the caption's "
                         "text states (e.g. SDXL's pooled text and image sizes, or class labels), which the scoring "
                         "does not give; use a UNet conditioned on the text encoder alone (Stable Diffusion 1.x/2.x "
                         "style)")
    text_dim = getattr(getattr(text_encoder, "config", None), "hidden_size", None)
    cross = getattr(cfg, "cross_attention_dim", None)
    widths = set(cross) if isinstance(cross, (list, tuple)) else {cross}  # one per block, in some configs
    if isinstance(text_dim, int) and any(isinstance(w, int) and w != text_dim for w in widths):
        raise ValueError(f"unet: its cross_attention_dim is {cross} but the text encoder gives states of {text_dim}; "
                         "pass the text encoder the UNet was trained with")
    latent = getattr(getattr(vae, "config", None), "latent_channels", None)
    if vae is not None and isinstance(latent, int) and cfg.in_channels != latent:
        raise ValueError(f"unet: takes {cfg.in_channels} input channels but the VAE makes latents of {latent}: an "
                         "inpainting or image-conditioned UNet, which also takes a picture beside the noisy latents; "
                         "use a text-to-image UNet")


# Keys that say which library wrote a config, or how its weights were stored, not what the module computes.
_CONFIG_NOISE = ("transformers_version", "torch_dtype", "dtype", "name_or_path", "architectures")


def _config_bytes(module: torch.nn.Module) -> bytes:
    """A module's config as canonical JSON (diffusers' or transformers'), without where it was loaded from
    (private keys such as _name_or_path) or which library version wrote it."""
    config = getattr(module, "config", None)
    items = config.to_dict() if hasattr(config, "to_dict") and not isinstance(config, dict) else dict(config or {})
    kept = {k: v for k, v in items.items() if not k.startswith("_") and k not in _CONFIG_NOISE}
    return json.dumps(kept, sort_keys=True, default=str).encode()


# Schedulers whose models are not trained as DDPM: the scoring's loss (noise at alphas_cumprod) is not theirs.
_OTHER_OBJECTIVES = {"FlowMatch": "flow matching", "EDM": "EDM (Karras et al.)", "ScoreSdeVe": "score SDE (VE)",
                     "CMStochasticIterative": "consistency model"}


def _check_scheduler_kind(class_name: object) -> None:
    if not isinstance(class_name, str):
        return
    for prefix, what in _OTHER_OBJECTIVES.items():
        if class_name.startswith(prefix):
            raise ValueError(f"scheduler: {class_name} belongs to a {what} model, trained with another loss than the "
                             "DDPM noise prediction the scoring measures; use a model whose scheduler config is of "
                             "the DDPM family (DDPM, DDIM, PNDM, Euler, DPMSolver...)")


def _check_shapes(unet: torch.nn.Module) -> None:
    cfg = getattr(unet, "config", None)
    if cfg is None:
        return
    if getattr(cfg, "sample_size", 0) is None:
        raise ValueError("unet: its config sets no sample_size; set it to the size of the UNet's inputs (e.g. 64 "
                         "for Stable Diffusion 1.x's 64x64 latents) in unet/config.json")
    if getattr(cfg, "out_channels", None) != getattr(cfg, "in_channels", None):
        raise ValueError(f"unet: predicts {cfg.out_channels} channels from {cfg.in_channels} (e.g. a learned "
                         "variance beside the noise); the scoring compares a prediction of the input's shape with "
                         "its target; use a UNet whose out_channels equal its in_channels")


def _stamp(module: torch.nn.Module) -> tuple:
    tensors = [*module.parameters(), *module.buffers()]
    return (id(module), tuple((t.data_ptr(), t._version) for t in tensors))


def _hash_module(h: "hashlib._Hash", module: torch.nn.Module) -> None:
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
