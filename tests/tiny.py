"""A tiny random text-to-image model and training folder, built in seconds for engine tests."""
import json
from pathlib import Path

import numpy as np
import torch

WORDS = ["a", "red", "blue", "green", "square", "circle", "small", "big", "dot", "line"]


def build_model(root: Path, seed: int = 0, prediction_type: str = "epsilon", latent: bool = False) -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgetscore.digits.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(words=WORDS, max_length=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id))
    channels = 4 if latent else 1
    unet = UNet2DConditionModel(
        sample_size=4 if latent else 8, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4)
    sched = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    for name, part in (("tokenizer", tok), ("text_encoder", text), ("unet", unet), ("scheduler", sched)):
        part.save_pretrained(root / name)
    if latent:
        vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 8),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=4, sample_size=8)
        vae.save_pretrained(root / "vae")
    return root


def build_train(root: Path, n: int = 10, seed: int = 0, size: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        arr = (rng.random((size, size)) * 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"{i:03d}.png")
        caps = [" ".join(rng.choice(WORDS, size=3)) for _ in range(1 + i % 3)]
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caps if i % 2 else caps[0]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def folder_fixtures(n: int, name: str = "tiny"):
    """Module-scoped fixtures for a test module to bind at its top level (`dirs, model, train = ...`):
    `dirs` (a model folder and a training folder of `n` images), `model` and `train` loaded from them."""
    import pytest

    from forgetscore.attribution import DiffusionModel, TrainingSet

    @pytest.fixture(scope="module")
    def dirs(tmp_path_factory):
        root = tmp_path_factory.mktemp(name)
        return build_model(root / "model"), build_train(root / "train", n=n)

    @pytest.fixture(scope="module")
    def model(dirs):
        return DiffusionModel.load(dirs[0])

    @pytest.fixture(scope="module")
    def train(dirs):
        return TrainingSet.load(dirs[1])

    return dirs, model, train
