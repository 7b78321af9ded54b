"""A model folder as researchers have them: what its identity holds, weights its files lack or hold beyond
its config, schedulers of other objectives, tokenizers without a length, and queries the model generates."""
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from forgetscore.attribution import DiffusionModel


def _edit_json(path: Path, **changes) -> None:
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def latent(tmp_path) -> Path:
    return tiny.build_model(tmp_path / "latent", seed=int(torch.randint(0, 2 ** 31, ())), latent=True)


def test_the_encoders_id_holds_their_configs_and_the_input_size(latent, tmp_path):
    """Prepared latents depend on the VAE's scaling factor, the text encoder's activation and the input size:
    a model that differs only there must not read another's prepared data."""
    import shutil

    base = DiffusionModel.load(latent).encoders_id()
    for part, changes in (("vae/config.json", {"scaling_factor": 1.0}),
                          ("text_encoder/config.json", {"hidden_act": "gelu"}),
                          ("unet/config.json", {"sample_size": 8})):
        other = tmp_path / part.replace("/", "-")
        shutil.copytree(latent, other)
        _edit_json(other / part, **changes)
        assert DiffusionModel.load(other).encoders_id() != base, part
    # Which library version wrote a config says nothing of what the model computes.
    same = tmp_path / "same"
    shutil.copytree(latent, same)
    _edit_json(same / "text_encoder" / "config.json", transformers_version="0.0.1")
    _edit_json(same / "vae" / "config.json", _diffusers_version="0.0.1")
    assert DiffusionModel.load(same).encoders_id() == base


def test_a_weight_missing_from_the_files_is_refused_and_an_extra_one_is_named(tmp_path):
    root = tiny.build_model(tmp_path / "m")
    unet_file = root / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(unet_file)
    kv = next(name for name in weights if "attn2.to_k.weight" in name)
    save_file({**weights, "mid_block.extra.weight": torch.zeros(3)}, unet_file)
    with pytest.warns(UserWarning, match=r"^model: unet/ of .* holds weights its config does not use "
                                         r"\(mid_block.extra.weight\); they are left out"):
        DiffusionModel.load(root)
    del weights[kv]
    save_file(weights, unet_file)
    with pytest.raises(ValueError, match=rf"^model: unet/ of .* lacks weights its config needs \({kv}\): they would "
                                         "be random"):
        DiffusionModel.load(root)
    text_file = root / "text_encoder" / "model.safetensors"
    renamed = {"cond_stage_model.transformer." + n: v for n, v in load_file(text_file).items()}
    save_file(renamed, text_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"^model: (unet|text_encoder)/ of .* lacks weights"):
        DiffusionModel.load(root)


@pytest.mark.parametrize("scheduler", ["FlowMatchEulerDiscreteScheduler", "EDMEulerScheduler"])
def test_a_scheduler_of_another_objective_is_refused(tmp_path, scheduler):
    root = tiny.build_model(tmp_path / "m")
    _edit_json(root / "scheduler" / "scheduler_config.json", _class_name=scheduler)
    with pytest.raises(ValueError, match=rf"^scheduler: {scheduler} belongs to a .* model, trained with another "
                                         "loss"):
        DiffusionModel.load(root)


def test_a_tokenizer_without_a_length_pads_to_the_text_encoders_positions(tmp_path):
    root = tiny.build_model(tmp_path / "m")
    config = json.loads((root / "tokenizer" / "tokenizer_config.json").read_text())
    config.pop("model_max_length", None)
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(config))
    model = DiffusionModel.load(root)
    assert model.tokenizer.model_max_length > 10 ** 6  # the transformers placeholder
    assert model.max_length == model.text_encoder.config.max_position_embeddings == 8
    assert model.encode_text(["a red dot"]).shape == (1, 8, 16)


def test_generation_keeps_a_latent_models_predictions_unclipped_unless_its_config_asks(latent, monkeypatch):
    """A config that leaves clip_sample out loads with DDPM's default (True); latents are not bounded by 1."""
    import diffusers

    from forgetscore.attribution.generate import generate

    made = []
    real = diffusers.DDIMScheduler.from_config

    def spy(config, **kwargs):
        made.append(real(config, **kwargs))
        return made[-1]

    monkeypatch.setattr(diffusers.DDIMScheduler, "from_config", spy)
    config_file = latent / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config.pop("clip_sample", None)
    config_file.write_text(json.dumps(config))
    generate(DiffusionModel.load(latent), ["a red dot"], 0, steps=2)
    assert made[-1].config.clip_sample is False
    _edit_json(config_file, clip_sample=True)  # said in the file: kept
    generate(DiffusionModel.load(latent), ["a red dot"], 0, steps=2)
    assert made[-1].config.clip_sample is True
    pixel_root = tiny.build_model(latent.parent / "pixel")
    config = json.loads((pixel_root / "scheduler" / "scheduler_config.json").read_text())
    config.pop("clip_sample", None)
    (pixel_root / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    generate(DiffusionModel.load(pixel_root), ["a red dot"], 0, steps=2)
    assert made[-1].config.clip_sample is True  # pixels are bounded: DDPM's default stays


def test_a_pixel_models_generated_query_is_its_picture_clipped(tmp_path):
    from forgetscore.attribution import Attributor, TrainingSet
    from forgetscore.attribution.generate import generate

    root = tiny.build_model(tmp_path / "m", seed=int(torch.randint(0, 2 ** 31, ())))
    _edit_json(root / "scheduler" / "scheduler_config.json", clip_sample=False)
    model = DiffusionModel.load(root)
    att = Attributor(model, TrainingSet.load(tiny.build_train(tmp_path / "t", n=3)), cache_dir=tmp_path / "c",
                     progress=False)
    seed = int(torch.randint(0, 2 ** 31, ()))
    raw = generate(model, ["a red dot"], [seed], steps=3, guidance_scale=30.0)[0]
    query = att.generate("a red dot", seed, steps=3, guidance_scale=30.0)
    assert raw.abs().max() > 1  # a strong guidance overshoots
    torch.testing.assert_close(query, raw.clamp(-1, 1), rtol=0, atol=0)
    att.query_inputs(query)  # accepted as the picture it is


def test_a_step_that_lowers_the_querys_loss_is_warned_about(tmp_path, monkeypatch):
    from forgetscore.attribution import Attributor, ScoringPlan, TrainingSet, UnlearnConfig

    model = DiffusionModel.load(tiny.build_model(tmp_path / "m"))
    att = Attributor(model, TrainingSet.load(tiny.build_train(tmp_path / "t", n=4)), cache_dir=tmp_path / "c",
                     plan=ScoringPlan(timesteps=(10, 500), seed=1), progress=False)
    losses = iter([0.5, 0.4])  # before, after: the step made the query easier, not harder
    monkeypatch.setattr(att, "query_loss", lambda *a, **k: next(losses))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        att.attribute(torch.zeros(1, 8, 8), "a red dot", config=UnlearnConfig(method="sgd", steps=1, draws=4,
                                                                              micro_batch=4))
    said = [str(w.message) for w in seen if str(w.message).startswith("unlearning: the step did not raise")]
    assert said == ["unlearning: the step did not raise the loss of the query (0.5 before, 0.4 after), so the "
                    "scores do not measure its forgetting; a step that overshoots can do this: try a smaller alpha "
                    "(or a larger --n-train), or more steps"]


def test_a_part_saved_as_bin_loads_without_an_error_line(tmp_path, capfd):
    from diffusers import UNet2DConditionModel

    root = tiny.build_model(tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    (root / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    unet.save_pretrained(root / "unet", safe_serialization=False)
    capfd.readouterr()
    model = DiffusionModel.load(root)
    assert "error" not in capfd.readouterr().err.lower()
    torch.testing.assert_close(dict(model.unet.named_parameters())["conv_in.weight"], unet.conv_in.weight)
