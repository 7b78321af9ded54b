"""How images are read: upright (EXIF orientation), resized by centre crop, and caches of the earlier reading."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from checks import raises
from forgetscore.attribution import PreparedData
from forgetscore.attribution.data import TrainingSet, check_image_headers, load_image, prepare

# What a viewer shows for each EXIF orientation, from the stored array (EXIF 2.3, tag 0x0112).
SHOWN = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
         5: lambda a: a.T, 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].T, 8: lambda a: np.rot90(a, 1)}


def save_oriented(path, arr: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(path, exif=exif.tobytes())


def as_pixels(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(arr).astype(np.float32) / 127.5 - 1)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_images_are_read_as_a_viewer_shows_them(tmp_path, orientation, suffix):
    stored = np.random.default_rng().integers(0, 256, (6, 10), dtype=np.uint8)  # 10 wide, 6 high as stored
    save_oriented(tmp_path / f"a{suffix}", stored, orientation)
    with Image.open(tmp_path / f"a{suffix}") as im:  # a JPEG's pixels as decoded, turned by numpy
        want = SHOWN[orientation](np.asarray(im))
    h, w = want.shape
    torch.testing.assert_close(load_image(tmp_path / f"a{suffix}", (1, h, w))[0], as_pixels(want), rtol=0, atol=0)


def test_the_header_check_takes_the_size_a_viewer_shows(tmp_path):
    stored = np.zeros((4, 8), dtype=np.uint8)  # 8 wide, 4 high as stored
    save_oriented(tmp_path / "turned.png", stored, 6)  # shown 4 wide, 8 high
    save_oriented(tmp_path / "mirrored.png", stored, 2)  # shown as stored
    data = TrainingSet(tmp_path, ["turned.png", "mirrored.png"], [["c"], ["c"]], [{}, {}])
    check_image_headers(data, [0], (1, 8, 4))
    raises("train", r"'.*turned\.png' is 4x8 but the model takes 8x4", check_image_headers, data, [0], (1, 4, 8))
    check_image_headers(data, [1], (1, 4, 8))
    raises("train", r"'.*mirrored\.png' is 8x4 but the model takes 4x8", check_image_headers, data, [1], (1, 8, 4))


@pytest.mark.parametrize("size, box", [((12, 8), (2, 0, 10, 8)), ((8, 13), (0, 2, 8, 10)), ((8, 8), (0, 0, 8, 8))])
def test_resize_cuts_the_centre_of_an_image_with_one_side_of_the_models_size(tmp_path, size, box):
    arr = np.random.default_rng().integers(0, 256, size[::-1], dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    left, top, right, bottom = box  # torchvision's CenterCrop offsets: round((13 - 8) / 2) = 2
    got = load_image(tmp_path / "a.png", (1, 8, 8), resize=True)[0]
    torch.testing.assert_close(got, as_pixels(arr[top:bottom, left:right]), rtol=0, atol=0)


def test_resize_keeps_the_proportions_of_a_tall_image(tmp_path):
    # Rows 0..23 of a 16-wide image hold 2 x row. Halved (the smaller factor that covers 8x8) it is 8 x 12:
    # row i of the halved image is centred on rows 2i, 2i+1, so a linear ramp reads 2 (2i + 0.5). The centre
    # keeps halved rows 2..9, so row i reads 4i + 9; stretching to 8x8 would read 3 per row.
    ramp = np.repeat((2 * np.arange(24, dtype=np.uint8))[:, None], 16, axis=1)
    Image.fromarray(ramp).save(tmp_path / "tall.png")
    got = load_image(tmp_path / "tall.png", (1, 8, 8), resize=True)[0]
    want = np.repeat((4 * np.arange(8) + 9.0)[:, None], 8, axis=1)
    torch.testing.assert_close(got.double(), as_pixels(want).double(), rtol=0, atol=1.01 / 127.5)


def test_a_photo_in_rgb_is_turned_before_it_is_cut(tmp_path):
    stored = np.random.default_rng().integers(0, 256, (8, 12, 3), dtype=np.uint8)  # 12 wide, 8 high
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(stored).save(tmp_path / "p.png", exif=exif.tobytes())
    shown = np.rot90(stored, 1)  # 8 wide, 12 high
    got = load_image(tmp_path / "p.png", (3, 8, 8), resize=True)
    torch.testing.assert_close(got, as_pixels(shown[2:10]).permute(2, 0, 1), rtol=0, atol=0)


dirs, model, train = tiny.folder_fixtures(5)


def test_a_cache_of_the_earlier_reading_is_made_again_only_where_the_caller_owns_it(model, train, tmp_path):
    first = prepare(model, train, tmp_path / "c", progress=False)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    (tmp_path / "c" / "manifest.json").write_text(json.dumps({**manifest, "format": 1}))
    raises("cache", r"prepared by an earlier version of forgetscore \(it read images differently", PreparedData,
           tmp_path / "c")
    raises("cache", r"was prepared with an earlier version of forgetscore .*use a fresh cache directory",
           prepare, model, train, tmp_path / "c", progress=False)
    again = prepare(model, train, tmp_path / "c", progress=False, untrusted="remove")
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["format"] == manifest["format"]
    np.testing.assert_array_equal(again.inputs(np.arange(len(train))), first.inputs(np.arange(len(train))))
    # Scores and losses cached from the earlier reading are keyed by the data id: it names the reading.
    assert again.data_id == f"{train.identity()}+f{manifest['format']}"


def test_files_cached_from_the_earlier_reading_are_removed(model, train, tmp_path):
    from safetensors.torch import save_file

    from forgetscore.attribution import Attributor

    cache = tmp_path / "c"
    cache.mkdir()
    from forgetscore.attribution.data import CACHE_FORMAT

    now = f"abc+f{CACHE_FORMAT}"
    for name, data_id in (("old", "abc"), ("old-half", "abc+float16"), ("old-f", f"abc+f{CACHE_FORMAT - 1}"),
                          ("new", now), ("new-half", now + "+float16")):
        (cache / f"before-{name}.json").write_text(json.dumps({"data_id": data_id}))
        np.save(cache / f"before-{name}.npy", np.zeros(3))
        save_file({"w": torch.zeros(2)}, str(cache / f"fisher-{name}.safetensors"),
                  metadata={"forgetscore": json.dumps({"data_id": data_id})})
    (cache / "fisher-damaged.safetensors").write_bytes(b"not a safetensors file")
    Attributor(model, train, cache_dir=cache, progress=False).prepare()
    left = sorted(p.name for p in cache.iterdir() if p.is_file() and p.name.startswith(("before-", "fisher-")))
    assert left == ["before-new-half.json", "before-new-half.npy", "before-new.json", "before-new.npy",
                    "fisher-damaged.safetensors", "fisher-new-half.safetensors", "fisher-new.safetensors"]


def test_the_gallery_shows_a_resized_training_image_as_the_model_saw_it(tmp_path):
    from forgetscore.attribution import Attribution
    from forgetscore.attribution.results import _top_images

    wide = np.random.default_rng().integers(0, 256, (8, 16), dtype=np.uint8)  # 16 wide, 8 high
    Image.fromarray(wide).save(tmp_path / "wide.png")
    result = Attribution(np.ones(1), np.ones((1, 1)), "p", torch.zeros(1, 8, 8), ["wide.png"], [["c"]])
    (shown,) = _top_images(result, tmp_path, 1)
    torch.testing.assert_close(shown[0], as_pixels(wide[:, 4:12]), rtol=0, atol=0)  # its centre, not squashed
