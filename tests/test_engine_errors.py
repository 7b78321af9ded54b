"""The engine on bad input: a ValueError that names the argument and says how to fix it,
and nothing already on disk overwritten or left half-written."""
import json
import os
import re
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from checks import raises
from conftest import fresh_seed
from forgetscore import cli
from forgetscore.attribution import (Attribution, Attributor, DiffusionModel, LossSweep, PreparedData, ScoringPlan,
                                     TrainingSet, UnlearnConfig, load_fisher, prepare, select_weights, unlearn)
from forgetscore.attribution.results import redraw
from forgetscore.attribution.unlearning import check_fisher

N = 6
PLAN = ScoringPlan(timesteps=(5, 500), flips=False)
CONFIG = UnlearnConfig(draws=4, micro_batch=4)
FISHER_SAMPLES = 8


# --- fixtures ---------------------------------------------------------------------------------
dirs, model, train = tiny.folder_fixtures(N)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Same architecture, other weights: another text encoder and another UNet."""
    return DiffusionModel.load(tiny.build_model(tmp_path_factory.mktemp("other") / "model", seed=1))


@pytest.fixture(scope="module")
def wide_model(model):
    """The tiny model with twice the UNet's channel widths: same parameter names, other shapes."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config({**model.unet.config, "block_out_channels": (16, 32)})
    return DiffusionModel(model.tokenizer, model.text_encoder, unet.eval().requires_grad_(False), model.scheduler)


@pytest.fixture(scope="module")
def fishers(model, train, tmp_path_factory):
    """Fisher files saved by the Attributor for the 'kv' and the 'cross-attn' presets."""
    cache = tmp_path_factory.mktemp("fisher-cache")
    paths = {}
    for weights in ("kv", "cross-attn"):
        path = cache / f"{weights}.safetensors"
        Attributor(model, train, plan=PLAN, weights=weights, cache_dir=cache, progress=False).fisher(
            FISHER_SAMPLES, path=path)
        paths[weights] = path
    return paths


# --- helpers ----------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (half-written temporaries included)."""
    root = Path(root)
    if not root.exists():
        return {}
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def no_temporaries(root: Path) -> bool:
    return not [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


def copy_train(dirs, dest: Path) -> Path:
    return Path(shutil.copytree(dirs[1], dest))


def write_meta(folder: Path, lines: list[str]) -> None:
    (folder / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))


# --- training folder --------------------------------------------------------------------------
GOOD = '{"file_name": "000.png", "text": "a red dot"}'
FOLDER_CASES = {
    "no metadata": (None, r"needs a metadata\.jsonl with lines like"),
    "empty metadata": ([], r"lists no images; add a line per image"),
    "not json": ([GOOD, '{"file_name": "001.png", "text": "a"'], r"line 2 is not JSON .*one JSON object per line"),
    "not an object": ([GOOD, '["001.png", "a blue line"]'], r"line 2 is a JSON list, not an object; write it like"),
    "no file_name": ([GOOD, '{"text": "a blue line"}'], r'line 2 has no "file_name"; give the name of its image'),
    "no text": ([GOOD, '{"file_name": "001.png"}'], r'line 2 \(001\.png\) has no "text"; give its caption'),
    "caption key": ([GOOD, '{"file_name": "001.png", "caption": "a dot"}'],
                    r'line 2 \(001\.png\) has no "text" \(this line has \'caption\': rename it to "text"\)'),
    "empty text": ([GOOD, '{"file_name": "001.png", "text": []}'], r"line 2 .*no caption; give"),
    "blank caption": ([GOOD, '{"file_name": "001.png", "text": ["a dot", " "]}'],
                      r"line 2 \(001\.png\): caption 2 of 2 is blank; write it, or drop it"),
    "blank text": ([GOOD, '{"file_name": "001.png", "text": ""}'], r"line 2 \(001\.png\): its caption is blank"),
    "listed twice as ./": ([GOOD, '{"file_name": "./000.png", "text": "a dot"}'],
                           r"line 2 lists '\./000\.png' again \(first on line 1\)"),
    "outside the folder": ([GOOD, '{"file_name": "../train/001.png", "text": "a dot"}'],
                           r"line 2 names '\.\./train/001\.png', outside the training folder"),
    "absolute path": ([GOOD, '{"file_name": "/etc/hostname", "text": "a dot"}'],
                      r"line 2 names '/etc/hostname', an absolute path; give paths relative"),
    "missing image": ([GOOD, '{"file_name": "nope.png", "text": "a dot"}'],
                      r"image 'nope\.png' \(metadata\.jsonl line 2\) is missing .*; add the file or remove its line"),
    "listed twice": ([GOOD, '{"file_name": "001.png", "text": "a dot"}', GOOD],
                     r"line 3 lists '000\.png' again \(first on line 1\); each image must appear once"),
}


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_bad_training_folder(dirs, tmp_path, case):
    lines, fix = FOLDER_CASES[case]
    folder = copy_train(dirs, tmp_path / "train")
    if lines is None:
        (folder / "metadata.jsonl").unlink()
    else:
        write_meta(folder, lines)
    before = snapshot(folder)
    raises("train", fix, TrainingSet.load, folder)
    assert snapshot(folder) == before


def test_a_prepared_cache_of_a_changed_training_folder_says_what_differs(dirs, model, tmp_path):
    folder = copy_train(dirs, tmp_path / "train")
    prepare(model, TrainingSet.load(folder), tmp_path / "cache", progress=False)
    st = (folder / "003.png").stat()
    os.utime(folder / "003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # touched
    raises("cache", r"another training set: the folder's list of images, their captions, or an image's size or "
           r"modification time changed since; use a fresh cache directory, or delete that folder",
           prepare, model, TrainingSet.load(folder), tmp_path / "cache", progress=False)


def test_the_cache_of_a_training_folder_before_it_changed_is_pointed_out(dirs, model, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "root"))
    folder = copy_train(dirs, tmp_path / "train")
    first = Attributor(model, TrainingSet.load(folder), plan=PLAN)
    first.prepare()
    st = (folder / "003.png").stat()
    os.utime(folder / "003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # touched: another identity
    said: list[str] = []
    again = Attributor(model, TrainingSet.load(folder), plan=PLAN)
    again._log = said.append
    again.prepare()
    assert again.cache_dir != first.cache_dir
    size = sum(p.stat().st_size for p in first.cache_dir.rglob("*") if p.is_file())
    assert len(said) == 1 and said[0].startswith(f"cache: {str(first.cache_dir)!r} ({size / 1024:.1f} KiB) holds "
                                                 "this training folder as it was before it changed")
    assert said[0].endswith("`forgetscore cache --remove-stale` deletes every such folder)")
    other = copy_train(dirs, tmp_path / "other")  # another training folder's cache is not its concern
    elsewhere = Attributor(model, TrainingSet.load(other), plan=PLAN)
    elsewhere._log = said.append
    elsewhere.prepare()
    assert len(said) == 1


def test_a_cache_folder_a_copy_still_reads_is_not_pointed_out(dirs, model, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "root"))
    a, b = copy_train(dirs, tmp_path / "a"), copy_train(dirs, tmp_path / "b")
    assert TrainingSet.load(a).identity() == TrainingSet.load(b).identity()  # copies share one cache folder
    for folder in (a, b):
        Attributor(model, TrainingSet.load(folder), plan=PLAN).prepare()
    said: list[str] = []
    for folder in (b, a):  # b edited: a still reads the folder; then a too: nothing does
        st = (folder / "003.png").stat()
        os.utime(folder / "003.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
        edited = Attributor(model, TrainingSet.load(folder), plan=PLAN)
        edited._log = said.append
        edited.prepare()
        assert len(said) == (folder == a), said
    assert "holds this training folder as it was before it changed" in said[0]


def test_unreadable_image_is_named_at_prepare(dirs, model, tmp_path):
    folder = copy_train(dirs, tmp_path / "train")
    (folder / "002.png").write_bytes(b"\x89PNG but not really" + bytes(range(256)))
    train = TrainingSet.load(folder)  # listed and present: only decoding finds the problem
    att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "cache", progress=False)
    raises("train", rf"cannot read image '{re.escape(str(folder / '002.png'))}' .*give a path to a valid image",
           att.prepare)
    # Nothing half-written, and nothing left: no shard was finished, so there was nothing to resume.
    assert (tmp_path / "cache").is_dir() and list((tmp_path / "cache").iterdir()) == []
    shutil.copy(dirs[1] / "002.png", folder / "002.png")  # repaired: prepare now goes through
    data = Attributor(model, TrainingSet.load(folder), plan=PLAN, cache_dir=tmp_path / "cache",
                      progress=False).prepare()
    assert data.n == N and data.manifest["complete"]


def test_a_failed_prepare_leaves_no_folder_in_the_cache_root(dirs, model, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "root"))
    folder = copy_train(dirs, tmp_path / "train")
    (folder / "000.png").write_bytes(b"junk")
    att = Attributor(model, TrainingSet.load(folder), plan=PLAN, progress=False)
    raises("train", r"cannot read image .*000\.png", att.prepare)
    assert list((tmp_path / "root" / "runs").iterdir()) == []
    # A run whose folder holds other stages' files keeps it; finished shards are kept for a resume.
    (folder / "000.png").write_bytes((dirs[1] / "000.png").read_bytes())
    (folder / "004.png").write_bytes(b"junk")
    att = Attributor(model, TrainingSet.load(folder), plan=PLAN, progress=False)
    from forgetscore.attribution import data as data_mod
    real = data_mod.prepare
    monkeypatch.setattr("forgetscore.attribution.attributor.prepare",
                        lambda *a, **kw: real(*a, **{**kw, "shard_size": 2}))
    # A file that is no image is found by its header, before any shard is encoded.
    encoded: list[int] = []
    monkeypatch.setattr(model, "encode_images", lambda x, real=model.encode_images: encoded.append(1) or real(x))
    raises("train", r"cannot read image .*004\.png", att.prepare)
    assert encoded == [] and list((tmp_path / "root" / "runs").iterdir()) == []
    # A damaged image body only decoding finds: the shards before it are kept for a resume.
    good = (dirs[1] / "004.png").read_bytes()
    (folder / "004.png").write_bytes(good[:len(good) // 2])
    att = Attributor(model, TrainingSet.load(folder), plan=PLAN, progress=False)
    raises("train", r"cannot read image .*004\.png", att.prepare)
    assert encoded and list((att.cache_dir / "prepared").glob("inputs-[0-9]*.npy"))
    # That folder is tied to its training folder from the start: listed as unfinished, and stale (removable)
    # once the image is fixed, which gives the training folder another identity.
    from forgetscore.attribution.cache_index import remove_stale, scan

    (entry,) = scan(tmp_path / "root")
    assert entry.path == att.cache_dir and not entry.stale
    assert entry.what.startswith(f"{folder}: prepared ") and "(unfinished)" in entry.what
    (folder / "004.png").write_bytes(good)
    (entry,) = scan(tmp_path / "root")
    assert entry.stale and entry.what.startswith(f"{folder} (changed since: nothing reads this): prepared ")
    said: list[str] = []
    fixed = Attributor(model, TrainingSet.load(folder), plan=PLAN, progress=False)
    fixed._log = said.append
    fixed.prepare()
    assert len(said) == 1 and said[0].startswith(f"cache: {str(att.cache_dir)!r} (")
    assert remove_stale(scan(tmp_path / "root")) == ([entry], [], [])
    assert not att.cache_dir.exists() and fixed.cache_dir.is_dir()


def test_image_of_another_size_needs_resize(dirs, model, tmp_path):
    folder = copy_train(dirs, tmp_path / "train")
    Image.fromarray(np.full((16, 12), 200, dtype=np.uint8)).save(folder / "003.png")
    train = TrainingSet.load(folder)
    raises("train", r"'.*003\.png' is 12x16 but the model takes 8x8; resize the images or pass resize=True",
           prepare, model, train, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*.npy"))
    raises("cache", r"unfinished prepare", PreparedData, tmp_path / "cache")
    data = prepare(model, train, tmp_path / "cache", resize=True, progress=False)
    got = data.inputs(np.array([3]))[0, 0]
    torch.testing.assert_close(got, torch.full_like(got, 200 / 127.5 - 1))
    # Reused only as prepared: without resizing, the resized image is not what the run would read.
    raises("resize", r"holds training images resized .*pass resize=True \(--resize\)", prepare, model, train,
           tmp_path / "cache", progress=False)
    assert prepare(model, train, tmp_path / "cache", resize=True, progress=False).data_id == data.data_id
    # Prepared without resizing, every image had the model's size: reused with resize=True too.
    same = TrainingSet.load(dirs[1])
    first = prepare(model, same, tmp_path / "cache2", progress=False)
    again = prepare(model, same, tmp_path / "cache2", resize=True, progress=False)
    np.testing.assert_array_equal(again.inputs(np.arange(N)), first.inputs(np.arange(N)))


# --- model directory --------------------------------------------------------------------------
def test_model_path_that_is_not_a_directory(dirs, tmp_path):
    for path in (tmp_path / "absent", dirs[1] / "metadata.jsonl"):
        raises("model", r"is not a directory; pass a folder saved with save_pretrained", DiffusionModel.load, path)


def test_device_that_cannot_be_used(dirs, model, monkeypatch):
    raises("device", r"'gpu' is not a torch device; use cpu, cuda or cuda:N", DiffusionModel.load, dirs[0], "gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    raises("device", r"sees no CUDA GPU; use cpu, or install a CUDA build", DiffusionModel.load, dirs[0], "cuda")
    raises("device", r"sees no CUDA GPU", model.to, "cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    raises("device", r"'cuda:2' but there are 2 CUDA device\(s\); use cuda:0 to cuda:1", model.to, "cuda:2")
    assert next(model.unet.parameters()).device.type == "cpu"  # nothing moved


def test_model_directory_without_unet(dirs, tmp_path):
    bad = Path(shutil.copytree(dirs[0], tmp_path / "model", ignore=shutil.ignore_patterns("unet")))
    raises("model", r"lacks unet/; save the pipeline with save_pretrained", DiffusionModel.load, bad)
    shutil.rmtree(bad / "scheduler")
    raises("model", r"lacks unet/, scheduler/", DiffusionModel.load, bad)


@pytest.mark.parametrize("part,missing,named", [
    ("unet", "*", "config.json"), ("text_encoder", "*", "config.json"),
    ("unet", "*.safetensors", r"weights \(diffusion_pytorch_model\.safetensors\)"),
    ("text_encoder", "*.safetensors", r"weights \(model\.safetensors\)"),
    ("tokenizer", "tokenizer.json", r"tokenizer\.json \(or vocab\.json\)"),
    ("scheduler", "*", "scheduler_config.json")])
def test_model_part_without_its_files(dirs, tmp_path, part, missing, named):
    bad = Path(shutil.copytree(dirs[0], tmp_path / "model"))
    for f in (bad / part).glob(missing):
        f.unlink()
    raises("model", rf"{part}/ of .* has no {named}; save the pipeline again", DiffusionModel.load, bad)


def test_model_part_that_cannot_be_loaded(dirs, tmp_path):
    bad = Path(shutil.copytree(dirs[0], tmp_path / "model"))
    (bad / "unet" / "config.json").write_text("{not json")
    raises("model", r"cannot load unet/ .*save the pipeline again", DiffusionModel.load, bad)


def test_model_saved_as_an_fp16_variant_loads(dirs, tmp_path):
    """Parts saved only as ``*.fp16.safetensors`` (as many downloads are) load, their weights as stored."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    variant = Path(shutil.copytree(dirs[0], tmp_path / "model"))
    for part, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        for f in (variant / part).glob("*.safetensors"):
            f.unlink()
        cls.from_pretrained(dirs[0] / part).half().save_pretrained(variant / part, variant="fp16")
        assert [f.name for f in (variant / part).glob("*.safetensors")][0].endswith(".fp16.safetensors")
    got, want = DiffusionModel.load(variant), DiffusionModel.load(dirs[0])
    for part in ("unet", "text_encoder"):
        theirs = dict(getattr(want, part).named_parameters())
        for name, p in getattr(got, part).named_parameters():
            assert p.dtype == torch.float32
            torch.testing.assert_close(p, theirs[name].half().float(), rtol=0, atol=0)


@pytest.mark.parametrize("listed", [True, False])
def test_latent_model_without_its_vae_folder(tmp_path, listed):
    root = tiny.build_model(tmp_path / "latent", latent=True)
    shutil.rmtree(root / "vae")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                       "vae": ["diffusers", "AutoencoderKL"] if listed else [None, None]}))
    if listed:
        raises("model", r"lacks vae/, which its model_index\.json lists; copy the vae/ folder", DiffusionModel.load,
               root)
    else:  # a pipeline saved without one works on pixels
        assert DiffusionModel.load(root).vae is None


def test_model_with_unsupported_prediction_type(dirs, tmp_path):
    bad = Path(shutil.copytree(dirs[0], tmp_path / "model"))
    cfg = bad / "scheduler" / "scheduler_config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "prediction_type": "sample"}))
    raises("scheduler", r"'sample' is not supported; use a model trained with 'epsilon'", DiffusionModel.load, bad)


# --- a Fisher from another model --------------------------------------------------------------
def test_fisher_lacking_the_selected_weights(model, fishers):
    raises("fisher", r"has no entry for .*attn2\.to_q.*compute it for this model and preset",
           load_fisher, fishers["kv"], model, select_weights(model.unet, "cross-attn"))


def test_fisher_file_missing_or_damaged(model, fishers, tmp_path):
    kv = select_weights(model.unet, "kv")
    raises("fisher", r"does not exist; compute it first", load_fisher, tmp_path / "none.safetensors", model, kv)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(fishers["kv"].read_bytes()[:-100])
    raises("fisher", r"cannot read .*cut\.safetensors.*delete it to compute it again", load_fisher, cut, model, kv)


def test_fisher_of_a_wider_preset_serves_a_narrower_one(model, fishers):
    # A diagonal Fisher's entry depends only on its own weight, so the kv entries of a cross-attn
    # Fisher are the kv Fisher: using it for "kv" is right, not a mix-up.
    kv = select_weights(model.unet, "kv")
    wide, narrow = load_fisher(fishers["cross-attn"], model, kv), load_fisher(fishers["kv"], model, kv)
    for n in kv:
        torch.testing.assert_close(wide[n], narrow[n], rtol=1e-6, atol=0)


def test_fisher_of_other_widths(wide_model, fishers, model):
    # The saved model identity catches it first; without it, the shapes do.
    raises("fisher", r"another model.*compute",
           load_fisher, fishers["kv"], wide_model, select_weights(wide_model.unet, "kv"))
    f = load_fisher(fishers["kv"], model, select_weights(model.unet, "kv"))
    raises("fisher", r"has shape \(8, 16\), the model's weight \(16, 16\).*compute",
           check_fisher, f, wide_model.unet, select_weights(wide_model.unet, "kv"), 0.0)


def test_fisher_of_a_model_with_the_same_shapes(other_model, fishers):
    raises("fisher", r"another model.*compute", load_fisher, fishers["kv"], other_model,
           select_weights(other_model.unet, "kv"))


def _unlearn(model, train, fisher, damping):
    x0 = torch.rand(model.input_shape) * 2 - 1
    ctx = model.encode_text(["a red dot"])[0]
    return unlearn(model, list(fisher), fisher, x0, ctx, replace(CONFIG, damping=damping), len(train))


def test_zero_fisher_entry_needs_damping(model, train, fishers):
    kv = select_weights(model.unet, "kv")
    fisher = load_fisher(fishers["kv"], model, kv)  # loading checks with damping, so zeros pass here
    fisher = {n: f.clone() for n, f in fisher.items() if n in kv}
    fisher[kv[0]][0, 0] = 0
    raises("fisher", r"1 zero entries and damping is 0.*pass damping > 0", check_fisher, fisher, model.unet, kv, 0.0)
    raises("fisher", r"pass damping > 0", _unlearn, model, train, fisher, 0.0)
    original = {n: model.unet.get_parameter(n).clone() for n in kv}
    out = _unlearn(model, train, fisher, 0.1)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    for n in kv:  # the model itself is left as it was
        assert torch.equal(model.unet.get_parameter(n), original[n])


def test_all_zero_fisher_layer_is_refused_even_with_damping(model, train, fishers):
    kv = select_weights(model.unet, "kv")
    fisher = {n: f.clone() for n, f in load_fisher(fishers["kv"], model, kv).items() if n in kv}
    fisher[kv[0]].zero_()
    raises("fisher", r"zero", _unlearn, model, train, fisher, 0.1)


@pytest.mark.parametrize("field, value", [("steps", 0), ("draws", 2.5), ("micro_batch", -1), ("alpha", 0.0),
                                          ("alpha", float("nan")), ("damping", -0.1), ("n_train", 0),
                                          ("n_train", True), ("method", "adam")])
def test_bad_unlearning_settings(field, value):
    raises(field, "must be|is not", UnlearnConfig, **{field: value})


def test_n_train_sets_the_newton_steps_n(model, train, fishers):
    """alpha / N with N given (a model pretrained on more images than the scored folder holds)."""
    kv = select_weights(model.unet, "kv")
    fisher = {n: f for n, f in load_fisher(fishers["kv"], model, kv).items() if n in kv}
    x0 = torch.rand(model.input_shape, generator=torch.Generator().manual_seed(fresh_seed())) * 2 - 1
    ctx = model.encode_text(["a red dot"])[0]
    config = replace(CONFIG, damping=0.1, alpha=1.0)
    default = unlearn(model, kv, fisher, x0, ctx, config, len(train))
    larger = unlearn(model, kv, fisher, x0, ctx, replace(config, n_train=4 * len(train)), len(train))
    for n in kv:
        w = model.unet.get_parameter(n).double()
        step, quarter = default[n].double() - w, larger[n].double() - w
        assert float(step.abs().max()) > 0
        # float32 weights round each step: compare to that rounding, about eps * (|w| + |step|)
        torch.testing.assert_close(quarter, step / 4, rtol=2 ** -21, atol=float(w.abs().max()) * 2 ** -22)


# --- query and region -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def att(model, train, tmp_path_factory):
    return Attributor(model, train, plan=PLAN, cache_dir=tmp_path_factory.mktemp("att-cache"), progress=False)


def test_query_with_nan(att):
    query = torch.zeros(1, 8, 8)
    query[0, 3, 4] = float("nan")
    raises("query", r"NaN or inf; pass a finite image", att.query_inputs, query)


def test_an_unusable_cache_is_named_as_the_user_chose_it(model, train, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "file" / "cache"))
    raises("FORGETSCORE_CACHE", r"cannot be a folder", Attributor, model, train, plan=PLAN)
    raises("cache", r"cannot be a folder", Attributor, model, train, plan=PLAN, cache_dir=tmp_path / "file" / "c")


def test_query_pixels_out_of_range_or_8_bit(att, tmp_path):
    """Pixels in [0, 255] or 8-bit arrays would otherwise be scored as if in [-1, 1]."""
    rng = np.random.default_rng(fresh_seed())
    raises("query", r"8-bit pixels \(uint8\); .*x / 127\.5 - 1", att.query_inputs,
           rng.integers(0, 256, (1, 8, 8), dtype=np.uint8))
    raises("query", r"8-bit pixels", att.query_inputs, torch.zeros(1, 8, 8, dtype=torch.uint8))
    raises("query", r"pixels must lie in \[-1, 1\]; these span \[0, 255\]", att.query_inputs,
           torch.from_numpy(np.concatenate([[0.0, 255.0], rng.uniform(0, 255, 62)]).reshape(1, 8, 8)).float())
    # The tiny model works in pixels: its own samples may overshoot [-1, 1] a little, and are taken as they are.
    q = torch.full((1, 8, 8), 1.3)
    torch.testing.assert_close(att.query_inputs(q), q)
    # A latent model's VAE takes pixels in [-1, 1] exactly; its latents are not bounded.
    model = DiffusionModel.load(tiny.build_model(tmp_path / "latent", latent=True))
    latent_att = Attributor(model, att.train, plan=PLAN, cache_dir=tmp_path / "c", progress=False)
    raises("query", r"these span \[-1, 1\.2\]", latent_att.query_inputs,
           torch.linspace(-1, 1.2, int(np.prod(model.image_shape))).reshape(model.image_shape))
    latents = torch.full(model.input_shape, 3.0)
    torch.testing.assert_close(latent_att.query_inputs(latents), latents)


def test_query_of_the_wrong_shape(att):
    raises("query", r"shape \(3, 8, 8\) is neither the model's input \(1, 8, 8\) nor its image shape",
           att.query_inputs, torch.zeros(3, 8, 8))
    raises("query", r"expected an image path, a PIL image or a tensor", att.query_inputs, [[0.0]])
    raises("query", r"\(8, 8, 1\) .*PIL\.Image\.fromarray", att.query_inputs, np.zeros((8, 8, 1), dtype=np.float32))


def test_query_as_a_pil_image_or_an_array_reads_as_the_file(att, tmp_path):
    pixels = np.random.default_rng(fresh_seed()).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "q.png")
    want = torch.from_numpy(pixels[None].astype(np.float64) / 127.5 - 1).float()  # the tiny model works in pixels
    torch.testing.assert_close(att.query_inputs(tmp_path / "q.png"), want, rtol=0, atol=1e-7)
    with Image.open(tmp_path / "q.png") as im:
        torch.testing.assert_close(att.query_inputs(im), want, rtol=0, atol=1e-7)
    torch.testing.assert_close(att.query_inputs(want.numpy()), want, rtol=0, atol=0)
    raises("query", r"is 10x10 but the model takes 8x8; .*resize=True", att.query_inputs,
           Image.fromarray(np.zeros((10, 10), dtype=np.uint8)))


def test_api_arguments_of_the_wrong_type(model, train, dirs, att, tmp_path):
    from forgetscore.attribution import preset

    raises("plan", r"expected a ScoringPlan .*got str", Attributor, model, train, plan="mscoco", cache_dir=tmp_path)
    raises("train", r"expected a TrainingSet .*TrainingSet\.load", Attributor, model, str(dirs[1]), cache_dir=tmp_path)
    raises("model", r"expected a DiffusionModel", Attributor, str(dirs[0]), train, cache_dir=tmp_path)
    raises("model_dir", r"expected a folder path, got int", Attributor.load, 123, dirs[1])
    raises("train_dir", r"expected a folder path, got NoneType", Attributor.load, dirs[0], None)
    query = torch.zeros(1, 8, 8)
    raises("config", r"expected an UnlearnConfig .*got dict", att.attribute, query, "p", config={"steps": 1})
    raises("prompt", r"expected a string .*got NoneType", att.attribute, query, None, config=CONFIG)
    for k in (0, -2, True, 2.5, "3"):
        raises("k", r"must be an int >= 1", att.attribute, query, "p", k=k, config=CONFIG)
    raises("indices", r"empty; give at least one image id", att.attribute, query, "p", config=CONFIG, indices=[])
    raises("indices", rf"need ids in \[0, {N}\)", att.attribute, query, "p", config=CONFIG, indices=[0, N])
    raises("alpha", r"must be a number, not str", preset, "mscoco", alpha="0.1")
    raises("seed", r"must be an integer >= 0", UnlearnConfig, seed=-1)
    raises("steps", r"must be a positive integer", UnlearnConfig, steps=True)


def test_attribute_keeps_k_and_records_its_settings(att, train, tmp_path):
    import html

    import forgetscore

    pixels = np.random.default_rng(fresh_seed()).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "q.png")
    result = att.attribute(tmp_path / "q.png", "a red dot", k=3, config=CONFIG, fisher_samples=FISHER_SAMPLES,
                           indices=np.array([4, 0, 2, 5]))
    assert len(result.top()) == 3 and [r["rank"] for r in result.top_records()] == [1, 2, 3]
    assert len(result.top(6)) == 4  # only four images were scored
    out = result.save(tmp_path / "out", train_dir=train.root)
    rec = json.loads((out / "attribution.json").read_text())
    assert [r["id"] for r in rec["top"]] == result.top().tolist() and set(result.top().tolist()) < {0, 2, 4, 5}
    assert rec["n_train"] == N and rec["n_scored"] == 4
    assert rec["fisher_samples"] == FISHER_SAMPLES and rec["unlearn"]["n_train"] == N
    assert rec["batch_size"] == att.batch_size and rec["noise"] == "keyed" and rec["version"] == forgetscore.__version__
    assert rec["query"] == str(tmp_path / "q.png") and Path(rec["model"]).is_absolute()
    assert rec["text_dtype"] == "float32"
    page = (out / "report.html").read_text()
    settings = json.loads(html.unescape(re.search(r"<h2>Settings</h2><pre[^>]*>(.*?)</pre>", page, re.S).group(1)))
    assert settings["fisher_samples"] == FISHER_SAMPLES and settings["plan"] == PLAN.to_dict()


def test_recorded_settings_resolve_defaults_and_paths(dirs, train, tmp_path, monkeypatch):
    monkeypatch.chdir(dirs[0].parent)
    local = Attributor(DiffusionModel.load(dirs[0].name), train, plan=PLAN, cache_dir=tmp_path, progress=False)
    newton = local._settings(CONFIG, None, "max", None, N)
    assert newton["fisher_samples"] == 5 * N and newton["unlearn"]["n_train"] == N
    assert newton["model"] == str(dirs[0].resolve())
    assert local._settings(replace(CONFIG, method="sgd", n_train=7), None, "max", None, N)["fisher_samples"] is None
    assert local._settings(replace(CONFIG, n_train=7), 3, "max", None, N)["unlearn"]["n_train"] == 7


def test_query_file_missing_unreadable_or_of_another_size(att, tmp_path):
    raises("query", r"cannot read image .*absent\.png.*give a path to a valid image", att.query_inputs,
           tmp_path / "absent.png")
    (tmp_path / "junk.png").write_bytes(b"junk")
    raises("query", r"cannot read image .*junk\.png.*give a path to a valid image", att.query_inputs,
           tmp_path / "junk.png")
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(tmp_path / "big.png")
    raises("query", r"is 10x10 but the model takes 8x8; .*resize=True", att.query_inputs, tmp_path / "big.png")


@pytest.mark.parametrize("box", [(0, 0, 9, 8), (-1, 0, 4, 4), (4, 4, 4, 6), (0, 0, 4), (6, 6, 2, 2)])
def test_region_box_outside_the_image(att, box):
    raises("region", r"is not a box x0,y0,x1,y1 inside the 8x8 image", att.region_mask, box)


def test_region_mask_of_the_wrong_shape(att):
    raises("region", r"mask shape \(4, 4\) is not the image's \(8, 8\)", att.region_mask, torch.ones(4, 4))


def test_region_mask_selecting_nothing(att):
    raises("region", r"selects no pixel; ", att.region_mask, torch.zeros(8, 8))


# --- caches made under other models, data or plans --------------------------------------------
def test_prepared_cache_of_another_text_encoder(model, other_model, train, tmp_path):
    data = prepare(model, train, tmp_path / "prepared", progress=False)
    before = snapshot(tmp_path)
    raises("cache", r"another model's tokenizer, text encoder or VAE; use a fresh cache directory",
           Attributor(other_model, train, plan=PLAN, cache_dir=tmp_path, progress=False).prepare)
    raises("cache", r"another tokenizer, text encoder or VAE .*prepare again for this model",
           LossSweep, other_model, data, PLAN)
    assert snapshot(tmp_path) == before


def test_prepared_cache_of_other_data_or_shards(model, train, tmp_path):
    prepare(model, train, tmp_path / "prepared", progress=False)
    before = snapshot(tmp_path)
    other = TrainingSet.load(tiny.build_train(tmp_path / "other-train", n=N, seed=1))
    raises("cache", r"another training set: .*; use a fresh cache directory", prepare, model, other, tmp_path / "prepared")
    raises("cache", r"another shard_size .*use a fresh cache directory", prepare, model, train, tmp_path / "prepared",
           shard_size=2)
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("other-train/")} == before


def test_prepared_inputs_of_another_shape(model, train, tmp_path):
    from diffusers import UNet2DConditionModel

    data = prepare(model, train, tmp_path / "prepared", progress=False)
    unet = UNet2DConditionModel.from_config({**model.unet.config, "sample_size": 4})
    small = DiffusionModel(model.tokenizer, model.text_encoder, unet, model.scheduler)
    raises("cache", r"shape \(1, 8, 8\), the UNet takes \(1, 4, 4\); prepare again", LossSweep, small, data, PLAN)


@pytest.mark.parametrize("key", ["plan", "unet_id"])
def test_before_losses_made_under_another_plan_or_model(model, train, tmp_path, key):
    att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path, progress=False)
    att.before_losses()
    (meta,) = tmp_path.glob("before-*.json")
    rec = json.loads(meta.read_text())
    rec[key] = {"plan": {**rec["plan"], "timesteps": [1, 2]}, "unet_id": "0123456789abcdef"}[key]
    meta.write_text(json.dumps(rec))
    before = snapshot(tmp_path)
    again = Attributor(model, train, plan=PLAN, cache_dir=tmp_path, progress=False)
    raises("cache", r"was made under another plan or model; delete it", again.before_losses)
    assert snapshot(tmp_path) == before


def test_damaged_before_losses_are_named(model, train, tmp_path):
    Attributor(model, train, plan=PLAN, cache_dir=tmp_path, progress=False).before_losses()
    (losses,) = tmp_path.glob("before-*.npy")
    losses.write_bytes(losses.read_bytes()[:-9])
    again = Attributor(model, train, plan=PLAN, cache_dir=tmp_path, progress=False)
    raises("cache", r"cannot read .*before-.*\.npy.*delete it to recompute", again.before_losses)


def _arrays(data: PreparedData):
    ids = np.arange(data.n)
    return data.inputs(ids).numpy(), data.text(ids, "all")[0].numpy(), np.asarray(data.caption_offsets)


def test_prepared_reads_against_a_plain_loop(model, train, tmp_path):
    """inputs/text gather from several shards in any order, repeats included, as a per-image loop would."""
    _check_reads(prepare(model, train, tmp_path / "p", shard_size=2, batch_size=2, progress=False), train)
    # float16 caption states are read back as float32
    _check_reads(prepare(model, train, tmp_path / "h", shard_size=2, batch_size=2, text_dtype="float16",
                         progress=False), train)


def _check_reads(data, train):
    shards = data.manifest["shards"]
    files_in = [np.load(data.dir / sh["inputs"]) for sh in shards]
    files_text = [np.load(data.dir / sh["text"]).astype(np.float32) for sh in shards]
    caps = [len(c) for c in train.captions]
    assert len(set(caps)) > 1 and len(shards) == 3
    gen = np.random.default_rng(fresh_seed("index"))
    for ids in (gen.integers(0, N, 9), np.array([5, 0, 0, 3]), np.arange(N), np.array([], dtype=np.int64)):
        want_in, want_text, want_counts = [], [], {"all": [], "first": []}
        for i in ids:
            s, r = divmod(int(i), 2)
            want_in.append(files_in[s][r])
            start = sum(caps[2 * s:i])  # rows of this shard's earlier images
            want_text.append(files_text[s][start:start + caps[i]])
            want_counts["all"].append(caps[i])
            want_counts["first"].append(1)
        got = data.inputs(ids)
        assert got.shape == (len(ids), 2, *data.input_shape)
        if len(ids):
            np.testing.assert_array_equal(got.numpy(), np.stack(want_in))
        for mode in ("all", "first"):
            text, counts = data.text(ids, mode)
            assert counts == want_counts[mode] and text.dtype == torch.float32
            rows = [t if mode == "all" else t[:1] for t in want_text]
            if len(ids):
                np.testing.assert_array_equal(text.numpy(), np.concatenate(rows))
            else:
                assert text.shape[0] == 0
        # One chosen caption of each image, read alone.
        which = np.array([gen.integers(0, caps[i]) for i in ids], dtype=np.int64)
        one = data.caption_states(ids, which)
        assert one.shape == (len(ids), *data._text[0].shape[1:]) and one.dtype == torch.float32
        if len(ids):
            np.testing.assert_array_equal(one.numpy(), np.stack([t[c] for t, c in zip(want_text, which)]))
    for bad in (np.array([N]), np.array([0, -1])):
        raises("indices", rf"ids must lie in \[0, {N}\)", data.inputs, bad)
        raises("indices", rf"ids must lie in \[0, {N}\)", data.text, bad, "all")
        raises("indices", rf"ids must lie in \[0, {N}\)", data.caption_states, bad, np.zeros(len(bad), dtype=int))
    few = int(np.argmin(caps))
    raises("captions", rf"image {few} has {caps[few]} caption\(s\), so caption {caps[few]} does not exist",
           data.caption_states, np.array([few]), np.array([caps[few]]))
    raises("captions", "one integer caption index per image", data.caption_states, np.array([0, 1]), np.array([0]))
    raises("captions", "one integer caption index per image", data.caption_states, np.array([0]), np.array([0.0]))


def _counting(monkeypatch, model, fail_at: int | None = None) -> list[int]:
    calls, real = [], DiffusionModel.encode_images.__get__(model)  # the method, not an earlier patch

    def encode_images(pixels):
        calls.append(len(pixels))
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(pixels)

    monkeypatch.setattr(model, "encode_images", encode_images)
    return calls


def test_interrupted_prepare_resumes_to_the_same_arrays(model, train, tmp_path, monkeypatch):
    kw = dict(shard_size=2, batch_size=2, progress=False)  # 3 shards, one encoder call each
    full = prepare(model, train, tmp_path / "full", **kw)
    cut = tmp_path / "cut"
    _counting(monkeypatch, model, fail_at=3)
    with pytest.raises(KeyboardInterrupt):
        prepare(model, train, cut, **kw)
    manifest = json.loads((cut / "manifest.json").read_text())
    assert manifest["complete"] is False and no_temporaries(cut)
    assert sorted(p.name for p in cut.glob("*.npy")) == [f"{kind}-{s:05d}.npy" for kind in ("inputs", "text")
                                                         for s in range(2)]
    raises("cache", r"unfinished prepare; run prepare again to resume it", PreparedData, cut)
    calls = _counting(monkeypatch, model)
    resumed = prepare(model, train, cut, **kw)
    assert calls == [4]  # only the third shard (2 images and their flips) was encoded again
    for a, b in zip(_arrays(resumed), _arrays(full)):
        np.testing.assert_array_equal(a, b)
    assert resumed.manifest == full.manifest


def test_prepare_redoes_shard_files_no_manifest_vouches_for(model, train, tmp_path):
    """Shard files without a matching manifest (a crash before its write, or another run's) are not trusted."""
    kw = dict(shard_size=2, batch_size=2, progress=False)
    full = prepare(model, train, tmp_path / "full", **kw)
    stale = tmp_path / "stale"
    stale.mkdir()
    np.save(stale / "inputs-00000.npy", np.zeros((2, 2, *model.input_shape), dtype=np.float32))
    np.save(stale / "text-00000.npy", np.zeros((3, 8, 16), dtype=np.float32))
    # Someone else's files in the folder, temporary ones included: never touched.
    (stale / "embeddings-00001.npy").write_bytes(b"theirs")
    (stale / ".draft.tmp").write_bytes(b"theirs")
    with pytest.raises(ValueError, match=r"cache: .*holds chunk files \(inputs-00000\.npy.*no manifest\.json"):
        prepare(model, train, stale, **kw)
    assert not (stale / "manifest.json").exists()
    (stale / ".text-00001.npy.abc123.tmp").write_bytes(b"a killed write")
    for a, b in zip(_arrays(prepare(model, train, stale, untrusted="remove", **kw)), _arrays(full)):
        np.testing.assert_array_equal(a, b)
    assert (stale / "embeddings-00001.npy").read_bytes() == (stale / ".draft.tmp").read_bytes() == b"theirs"
    assert not (stale / ".text-00001.npy.abc123.tmp").exists()


def test_prepare_remakes_the_lost_or_damaged_files_of_a_finished_store(model, train, tmp_path, monkeypatch):
    from forgetscore.attribution import data as data_mod

    kw = dict(shard_size=2, batch_size=2, progress=False)
    cache = tmp_path / "cache"
    want = [np.array(a) for a in _arrays(prepare(model, train, cache, **kw))]
    (cache / "inputs-00001.npy").unlink()
    (cache / "caption_offsets.npy").write_bytes(b"junk")
    raises("cache", r"caption_offsets\.npy' is missing or damaged .*run prepare again", data_mod.PreparedData, cache)
    encoded = []
    real = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda x: (encoded.append(len(x)), real(x))[1])
    for a, b in zip(_arrays(prepare(model, train, cache, **kw)), want):
        np.testing.assert_array_equal(a, b)
    assert sum(encoded) == 2 * 2  # only the lost shard: its 2 images and their flips
    encoded.clear()
    prepare(model, train, cache, **kw)
    assert encoded == []  # intact now: nothing made again


# --- the output directory ---------------------------------------------------------------------
def _result(train, seed: int) -> Attribution:
    rng = np.random.default_rng(seed)
    scores = rng.random(len(train))
    return Attribution(scores, scores[:, None], "a red dot", torch.rand(1, 8, 8) * 2 - 1, train.file_names,
                       train.captions, {"train_dir": str(train.root)})


def test_a_result_built_by_hand_saves_with_its_folder_and_loads_back(dirs, train, tmp_path):
    rng = np.random.default_rng()
    scores = rng.normal(size=len(train))
    made = Attribution(scores, rng.normal(size=(len(train), 2)), "a red dot", torch.rand(1, 8, 8) * 2 - 1,
                       train.file_names, train.captions)
    made.save(tmp_path / "out", train_dir=dirs[1])
    again = Attribution.load(tmp_path / "out")
    np.testing.assert_array_equal(again.scores, scores)
    np.testing.assert_array_equal(again.tau, made.tau)
    assert again.metadata["train_dir"] == str(Path(dirs[1]).resolve())
    assert again.top_records(3) == made.top_records(3)
    with pytest.warns(UserWarning, match=r"^train_dir: none given and the result records none"):
        made.save(tmp_path / "bare")  # without its folder: saved, but nothing tells load() where the images are
    with pytest.raises(ValueError, match=r"lacks train_dir, data_id; .* or by Attribution.save\(out, train_dir="):
        Attribution.load(tmp_path / "bare")


@pytest.mark.parametrize("field, value, match", [
    ("scores", np.zeros(3), r"^scores: shape \(3,\); give one score per training image"),
    ("tau", np.zeros((3, 2)), r"^tau: shape \(3, 2\); give \[\d+, versions\]"),
    ("tau", np.zeros(10), r"^tau: shape"),
    ("captions", [["c"]], r"^captions: 1 entries for \d+ file_names"),
])
def test_a_result_whose_parts_disagree_in_length_is_refused(train, field, value, match):
    n = len(train)
    parts = {"scores": np.zeros(n), "tau": np.zeros((n, 1)), "prompt": "p", "query": torch.zeros(1, 8, 8),
             "file_names": train.file_names, "captions": train.captions, field: value}
    with pytest.raises(ValueError, match=match):
        Attribution(**parts)


def test_gallery_wraps_into_rows_of_tiles(train, monkeypatch):
    import io

    from forgetscore.attribution import report

    monkeypatch.setattr(report, "GALLERY_ROW", 4)
    result = _result(train, fresh_seed())
    k = len(train)  # the query and k images: rows of 4
    images = [train.load_pixels(int(i), (1, 8, 8)) for i in result.top(k)]
    canvas = Image.open(io.BytesIO(report.gallery(result, images, k))).convert("L")
    rows = -(-(k + 1) // 4)
    assert canvas.size == ((96 + 8) * 4 + 8, (96 + 30) * rows)
    for n in range(k + 1):  # each tile where its row and column put it: the query, then the top images in order
        x, y = 8 + (n % 4) * (96 + 8), (n // 4) * (96 + 30) + 8
        want = result.query if n == 0 else images[n - 1]
        want = np.asarray(Image.fromarray(report._to_uint8(want)).resize((96, 96), Image.NEAREST))
        np.testing.assert_array_equal(np.asarray(canvas.crop((x, y, x + 96, y + 96))), want)


def test_output_directory_holding_results(train, tmp_path):
    out = tmp_path / "out"
    _result(train, 0).save(out, train_dir=train.root, k=3)
    before = snapshot(out)
    raises("out", r"already holds results .*choose a new directory or pass overwrite=True",
           _result(train, 1).save, out, train_dir=train.root, k=3)
    assert snapshot(out) == before
    new = _result(train, 1)
    new.save(out, train_dir=train.root, k=3, overwrite=True)
    np.testing.assert_array_equal(np.load(out / "scores.npy"), new.scores)
    assert json.loads((out / "attribution.json").read_text())["top"] == new.top_records(3)
    assert no_temporaries(out)


def test_output_directory_holding_a_users_query_png(train, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "query.png").write_bytes(b"the user's own query")
    raises("out", r"already holds results \(query\.png\)", _result(train, 0).save, out, train_dir=train.root)
    assert snapshot(out) == {"query.png": b"the user's own query"}


def test_output_path_that_is_a_file(train, tmp_path):
    (tmp_path / "out").write_text("x")
    raises("out", r"exists and is not a directory; choose another path", _result(train, 0).save, tmp_path / "out")
    assert (tmp_path / "out").read_text() == "x"


def test_unreadable_training_image_writes_no_result(dirs, train, tmp_path):
    folder = copy_train(dirs, tmp_path / "train")
    (folder / "004.png").unlink()
    result = _result(train, 0)
    raises("train_dir", r"is not the training folder the result was made from, as it was \(.*004\.png.*is missing"
                        r".*\); pass that folder", result.save, tmp_path / "new", train_dir=folder, k=N)
    assert snapshot(tmp_path / "new") == {}
    out = tmp_path / "out"
    _result(train, 1).save(out, train_dir=train.root, k=3)
    before = snapshot(out)
    raises("train_dir", r"is not the training folder", result.save, out, train_dir=folder, k=N, overwrite=True)
    (folder / "004.png").write_bytes(b"not an image")  # listed and present, but unreadable
    raises("train_dir", r"cannot read .*004\.png.*pass the training folder the result was made from",
           result.save, out, train_dir=folder, k=N, overwrite=True)
    assert snapshot(out) == before


def test_redraw_of_a_directory_without_results(tmp_path):
    raises("out", r"holds no attribution\.json; run `forgetscore attribute` first", redraw, tmp_path)
    for name in ("bus", "cat"):  # as a --queries run lays out its results
        (tmp_path / name).mkdir()
        (tmp_path / name / "attribution.json").write_text("{}")
    raises("out", r"holds no attribution\.json, but its folders bus, cat do \(one result a query\); give one of "
                  r"them", redraw, tmp_path)


def test_redraw_refuses_a_training_folder_changed_since_and_damaged_results(dirs, train, tmp_path):
    folder = copy_train(dirs, tmp_path / "train")
    copied = TrainingSet.load(folder)
    result = _result(copied, 0)
    result.metadata.update(data_id=copied.identity(), train_dir=str(folder))
    out = tmp_path / "out"
    result.save(out, train_dir=folder, k=3)
    redraw(out, 4)  # unchanged: fine
    os.utime(folder / "000.png", (1, 1))  # as after a copy: the same images under the same names
    copy_or_edit = r"^train: '.*train' is not the folder as it was when these scores were made \(a copy, or an edit"
    with pytest.warns(UserWarning, match=copy_or_edit + r" of its images or captions\); its pictures"):
        redraw(out, 4)
    with pytest.warns(UserWarning, match=copy_or_edit):
        back = Attribution.load(out)  # read back as saved
    np.testing.assert_array_equal(back.scores, result.scores)
    np.testing.assert_array_equal(back.tau, result.tau)
    assert back.k == 3 and back.prompt == result.prompt and back.file_names == copied.file_names
    assert list(back.top()) == list(result.top(3)) and back.metadata["train_dir"] == str(folder)
    torch.testing.assert_close(back.query, result.query, rtol=0, atol=1 / 127.5)  # through 8-bit query.png
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    top = int(result.top(1)[0])
    edited = list(lines)
    edited[top] = json.dumps({**json.loads(lines[top]), "text": "an edited caption"})
    write_meta(folder, edited)  # the same names, one top image's caption edited: said by name
    with pytest.warns(UserWarning, match=rf"{copy_or_edit} of its images or captions: the captions of "
                                         rf"{copied.file_names[top]} changed\)"):
        redraw(out, 4)
    write_meta(folder, lines)
    moved = folder.rename(tmp_path / "moved")  # results copied to another machine, say
    raises("train", r"the training folder '.*train' of this result is gone; pass where it is now", redraw, out)
    with pytest.warns(UserWarning, match="a copy, or an edit"):
        assert redraw(out, 2, moved)[1] == 2
    with warnings.catch_warnings():  # named, and found to hold the names and captions scored: recorded as it is now
        warnings.simplefilter("error")
        assert cli.main(["report", "--out", str(out), "--train", str(moved)]) == 0
        assert redraw(out)[0].metadata["train_dir"] == str(moved)  # where it is now, recorded once told
        assert json.loads((out / "attribution.json").read_text())["train_dir"] == str(moved)
        moved.rename(folder)
        redraw(out, 3, folder)
    write_meta(folder, lines[::-1])  # the same images in another order: scores would name the wrong ones
    raises("train", r"has changed since these scores were made .*run attribute again", redraw, out)
    # Two images outside the saved top swapped: every name is compared, not only the top's.
    a, b = [i for i in range(len(lines)) if i not in set(result.top(3).tolist())][:2]
    swapped = list(lines)
    swapped[a], swapped[b] = swapped[b], swapped[a]
    write_meta(folder, swapped)
    raises("train", r"has changed since these scores were made .*run attribute again", redraw, out)
    raises("train_dir", r"lists other images than the \d+ scored .*pass the training folder the result was made from",
           result.save, tmp_path / "other", train_dir=folder)
    assert not (tmp_path / "other").exists()
    write_meta(folder, lines)
    redraw(out, 3)
    (out / "tau.npy").write_bytes(b"junk")
    raises("out", r"tau\.npy' is missing or damaged .*run attribute again", redraw, out)
    (out / "attribution.json").write_text("[]")
    raises("out", r"lacks prompt, top, train_dir, data_id", redraw, out)
    (out / "attribution.json").write_text("{")
    raises("out", r"attribution\.json' is damaged", redraw, out)


def test_sixteen_bit_and_float_images_keep_their_range(tmp_path):
    from PIL import Image

    from forgetscore.attribution.data import load_image

    from forgetscore.attribution.results import _top_images

    ramp = (np.arange(64, dtype=np.float64).reshape(8, 8) / 63)
    want = torch.from_numpy(np.round(ramp * 255) / 127.5 - 1)
    Image.fromarray((ramp * 65535).round().astype(np.uint16)).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode.startswith("I")
    torch.testing.assert_close(load_image(tmp_path / "a.png", (1, 8, 8))[0].double(), want, rtol=0, atol=1e-6)
    shown = _top_images(Attribution(np.ones(1), np.ones((1, 1)), "p", torch.zeros(1, 8, 8), ["a.png"], [["c"]]),
                        tmp_path, 1)
    torch.testing.assert_close(shown[0][0].double(), want, rtol=0, atol=1e-6)  # the gallery too
    for scale in (1, 255):
        Image.fromarray((ramp * scale).astype(np.float32)).save(tmp_path / "f.tiff")
        torch.testing.assert_close(load_image(tmp_path / "f.tiff", (1, 8, 8))[0].double(), want, rtol=0,
                                   atol=1e-6)
    Image.fromarray((ramp * 300).astype(np.float32)).save(tmp_path / "g.tiff")
    raises("query", r"floating-point values outside \[0, 1\] and \[0, 255\]", load_image, tmp_path / "g.tiff",
           (1, 8, 8))
    Image.fromarray((ramp * 200).astype(np.int32)).save(tmp_path / "i.tiff")
    raises("query", r"32-bit integer pixels", load_image, tmp_path / "i.tiff", (1, 8, 8))


def test_metadata_not_utf8_and_with_a_byte_order_mark(dirs, tmp_path):
    folder = copy_train(dirs, tmp_path / "train")
    text = (folder / "metadata.jsonl").read_text()
    (folder / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(TrainingSet.load(folder)) == len(TrainingSet.load(dirs[1]))
    (folder / "metadata.jsonl").write_bytes(text.replace("a", "\u00e9").encode("latin-1", "replace"))
    raises("train", r"is not UTF-8 text .*save it as UTF-8", TrainingSet.load, folder)


def test_reference_noise_settings_name_the_python_and_command_line_forms():
    raises("reference_batch", r"only used with noise='reference' \(--noise reference\); drop it", ScoringPlan,
           timesteps=(5,), reference_batch=3)
    raises("noise_device", r"only used with noise='reference' \(--noise reference\)", ScoringPlan, timesteps=(5,),
           noise_device="cpu")
    raises("reference_batch", r"not given; noise='reference' \(--noise reference\) needs the images per batch",
           ScoringPlan, timesteps=(5,), noise="reference")


def test_settings_that_fail_before_any_work(model, train, tmp_path):
    raises("chunk_size", r"must be an int >= 1", Attributor, model, train, cache_dir=tmp_path / "c", chunk_size=0)
    raises("backend", r"is not available here|runs on", Attributor, model, train, cache_dir=tmp_path / "c",
           backend="cuda")
    if not torch.cuda.is_available():
        raises("noise_device", r"needs a CUDA device .*--noise-device cpu", Attributor, model, train,
               cache_dir=tmp_path / "c", plan=replace(PLAN, noise="reference", reference_batch=2))
    (tmp_path / "file").write_bytes(b"")
    raises("cache", r"'.*file' is a file", Attributor, model, train, cache_dir=tmp_path / "file" / "c")
    att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", progress=False)
    raises("samples", r"must be an int >= 1", att.fisher, 0)
    for name, value in (("alpha", float("inf")), ("damping", float("inf")), ("damping", float("nan"))):
        raises(name, "must be a finite number", UnlearnConfig, **{name: value})


# --- the command line -------------------------------------------------------------------------
def test_cli_attribute_with_a_missing_train_folder(dirs, tmp_path, capsys):
    query = dirs[1] / "000.png"
    code = cli.main(["attribute", "--model", str(dirs[0]), "--train", str(tmp_path / "nowhere"),
                     "--cache", str(tmp_path / "cache"), "--prompt", "a red dot", "--query", str(query),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(r"forgetscore attribute: error: --train: '.*nowhere/metadata\.jsonl' not found; the training "
                    r"folder needs a metadata\.jsonl", err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
    code = cli.main(["attribute", "--model", str(dirs[0]), "--train", str(query), "--cache", str(tmp_path / "cache"),
                     "--prompt", "a red dot", "--query", str(query), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and re.match(r"forgetscore attribute: error: --train: '.*000\.png' is a file, not a folder; "
                                  r"give the training folder", err), err


def test_building_blocks_name_their_bad_arguments(model, att):
    from forgetscore.attribution import compute_fisher
    from forgetscore.attribution.dattri import DattriAttributor

    data = att.prepare()
    names = att.names
    x0 = att.query_inputs(torch.zeros(1, 8, 8))
    ctx = model.encode_text(["a red dot"])[0]
    for n_train in (0, -5, 2.5, None):
        raises("n_train", r"must be a positive integer", unlearn, model, names, None, x0, ctx,
               replace(CONFIG, method="sgd"), n_train)
    sweep = LossSweep(model, data, PLAN, batch_size=8)
    raises("indices", rf"must lie in \[0, {N}\)", sweep.run, [None], np.array([N]))
    raises("indices", r"must be integer image ids", sweep.run, [None], np.array([0.5, 1.7]))
    weight = model.unet.get_parameter(names[0])
    raises("variants", r"no weight named 'nope\.weight'", sweep.run, [{"nope.weight": weight}], np.array([0]))
    raises("variants", rf"{re.escape(names[0])} is \(1, 1\), the weight is", sweep.run,
           [{names[0]: torch.zeros(1, 1)}], np.array([0]))
    raises("data", r"expected Attributor\.prepare\(\)", LossSweep, model, "/tmp/x", PLAN)
    raises("names", r"expected a list of weight names", compute_fisher, model, data, names[0], samples=2)
    raises("names", r"no weight named 'nope'", compute_fisher, model, data, ["nope"], samples=2)
    raises("captions", r"'some' is not one of", compute_fisher, model, data, names, samples=2, captions="some")
    raises("reduce", r"'sum' is not one of", DattriAttributor, model, reduce="sum")
    raises("fisher_samples", r"must be an int >= 1", DattriAttributor, model, fisher_samples=0)


def test_unlearn_names_a_query_text_or_mask_of_the_wrong_shape(model, att):
    names = att.names
    x0 = att.query_inputs(torch.zeros(1, 8, 8))
    ctx = model.encode_text(["a red dot"])[0]
    sgd = replace(CONFIG, method="sgd")
    raises("x0", r"shape \(8, 8\) is not the UNet's input \(1, 8, 8\)", unlearn, model, names, None, x0[0], ctx, sgd, N)
    raises("ctx", r"is not one prompt's text states", unlearn, model, names, None, x0, ctx[None], sgd, N)
    raises("ctx", r"is not one prompt's text states", unlearn, model, names, None, x0, ctx[:, :3], sgd, N)
    raises("mask", r"does not broadcast to the query's", unlearn, model, names, None, x0, ctx, sgd, N,
           mask=torch.ones(3, 3))


@pytest.mark.parametrize("change, says", [
    ({"addition_embed_type": "text"}, r"^unet: its config sets addition_embed_type='text': it takes conditioning "
                                      r"beside the caption's text states"),
    ({"class_embed_type": "timestep"}, r"^unet: its config sets class_embed_type='timestep'"),
    ({"cross_attention_dim": 24}, r"^unet: its cross_attention_dim is 24 but the text encoder gives states of 16"),
    ({"in_channels": 9, "latent": True}, r"^unet: takes 9 input channels but the VAE makes latents of 4: an "
                                         r"inpainting or image-conditioned UNet"),
    ({"cross_attention_dim": [24, 24]}, r"^unet: its cross_attention_dim is \[24, 24\] but the text encoder gives "
                                        r"states of 16"),
    ({"sample_size": None}, r"^unet: its config sets no sample_size; set it"),
    ({"out_channels": 2}, r"^unet: predicts 2 channels from 1 \(e.g. a learned variance"),
])
def test_a_unet_that_takes_other_conditioning_is_refused(model, tmp_path, change, says):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    change = dict(change)
    vae = None
    if change.pop("latent", False):
        vae = AutoencoderKL.from_pretrained(tiny.build_model(tmp_path / "latent", latent=True) / "vae")
    config = {**{k: v for k, v in model.unet.config.items() if not k.startswith("_")}, **change}
    if config.get("addition_embed_type") == "text":
        config["encoder_hid_dim"] = None
    unet = UNet2DConditionModel.from_config(config)
    raises("unet", says, DiffusionModel, model.tokenizer, model.text_encoder, unet, model.scheduler, vae)


def test_a_file_name_written_on_windows_finds_its_file(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "sub" / "a.png")
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "b.png")
    write_meta(tmp_path, [json.dumps({"file_name": "sub\\a.png", "text": "a dot"}),
                          json.dumps({"file_name": "b.png", "text": "a dot"})])
    assert TrainingSet.load(tmp_path).file_names == ["sub/a.png", "b.png"]
    write_meta(tmp_path, [json.dumps({"file_name": "sub\\c.png", "text": "a dot"})])
    raises("train", r"image 'sub\\\\c.png' \(metadata.jsonl line 1\) is missing", TrainingSet.load, tmp_path)
