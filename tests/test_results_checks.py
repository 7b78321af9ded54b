"""Saved results and `forgetscore report`: what a result folder holds is checked as it is read back (scores of
another result, damaged arrays, fields of the wrong kind), a failed report leaves the folder as it was, the
training folder is recorded as it was named (a copy, a folder inside the result that moves with it), and the
report shows pictures of any size in their proportions."""
import errno
import html
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny
from checks import raises
from conftest import fresh_seed
from forgetscore import cli
from forgetscore.attribution import Attribution, TrainingSet
from forgetscore.attribution import report as drawing
from forgetscore.attribution import results
from forgetscore.attribution.results import redraw

N = 8


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root with its bytes (temporaries included)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def made(train_dir: Path, seed: int | None = None, k: int = 3, scores=None, **meta) -> Attribution:
    """A result of fresh random scores for the images of `train_dir`, built as a user builds one."""
    rng = np.random.default_rng(fresh_seed() if seed is None else seed)
    data = TrainingSet.load(train_dir)
    scores = rng.normal(size=len(data)) if scores is None else scores
    query = torch.from_numpy(rng.random((1, 8, 8), dtype=np.float32)) * 2 - 1
    return Attribution(scores, rng.normal(size=(len(data), 2)), "a red dot", query, data.file_names, data.captions,
                       dict(meta), k=k)


def saved(tmp_path: Path, name: str = "out", k: int = 3, seed: int | None = None) -> tuple[Path, Path, Attribution]:
    """A training folder and a result saved from it with its folder: (result folder, training folder, result)."""
    train = tmp_path / "train"
    if not train.exists():
        tiny.build_train(train, n=N, seed=fresh_seed("data"))
    result = made(train, seed, k)
    return result.save(tmp_path / name, train_dir=train), train, result


def report(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["report", *map(str, args)])
    got = capsys.readouterr()
    return code, got.out, got.err


def retimed(folder: Path) -> Path:
    """`folder` with one image's modification time changed, as a copy made without keeping times has."""
    os.utime(folder / "000.png", (1, 1))
    return folder


# --- a failed report changes nothing -------------------------------------------------------------------
def test_a_report_that_cannot_read_an_image_changes_nothing(tmp_path, capsys):
    out, train, result = saved(tmp_path)
    copy = Path(shutil.copytree(train, tmp_path / "copy"))
    top = result.file_names[int(result.top(1)[0])]
    (copy / top).write_bytes((train / top).read_bytes()[:60])  # cut short, as a failed copy leaves it
    before = snapshot(out)
    code, _, err = report(capsys, "--out", out, "--train", copy, "--topk", 2)
    assert code == 2 and snapshot(out) == before
    assert re.search(rf"error: --train: cannot read image '.*{top}' .*restore it", err), err
    assert "train_dir" not in err
    code, _, err = report(capsys, "--out", out)  # the folder it records is still the good one
    assert code == 0 and err == ""


def test_a_report_whose_second_file_cannot_be_written_changes_nothing(tmp_path, capsys, monkeypatch):
    out, train, _ = saved(tmp_path)
    copy = retimed(Path(shutil.copytree(train, tmp_path / "copy")))
    real = results.write_bytes

    def full(path, data):
        if "report.html" in Path(path).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(results, "write_bytes", full)
    before = snapshot(out)
    code, _, err = report(capsys, "--out", f"{out}", "--train", copy, "--topk", 5)
    assert code == 1 and snapshot(out) == before  # gallery.png, report.html and attribution.json as they were
    assert re.search(r"error: --out: cannot write '.*report\.html.*': No space left on device", err), err
    monkeypatch.undo()
    with pytest.raises(OSError, match=r"^out: cannot write"):
        monkeypatch.setattr(results, "write_bytes", full)
        redraw(out, 5)
    assert snapshot(out) == before


# --- the training folder recorded ------------------------------------------------------------------------
def test_the_training_folder_given_is_the_one_recorded(tmp_path):
    out, train, _ = saved(tmp_path)
    copy = retimed(Path(shutil.copytree(train, tmp_path / "copy")))
    identity = TrainingSet.load(copy).identity()
    back = Attribution.load(out)
    back.save(tmp_path / "again", train_dir=copy)
    rec = json.loads((tmp_path / "again" / "attribution.json").read_text())
    assert rec["train_dir"] == str(copy.resolve()) and rec["data_id"].split("+")[0] == identity
    with pytest.warns(UserWarning, match="is not the folder as it was"):
        there = Attribution.load(out, train_dir=copy)
    assert there.metadata["train_dir"] == str(copy.resolve()) and there.metadata["data_id"] == identity
    with warnings.catch_warnings():  # saved from where it was loaded: that folder, as it is now
        warnings.simplefilter("error")
        there.save(tmp_path / "third")
        Attribution.load(tmp_path / "third")
    assert json.loads((tmp_path / "third" / "attribution.json").read_text())["train_dir"] == str(copy.resolve())


def test_a_copy_named_to_report_is_recorded_once_checked(tmp_path, capsys):
    out, train, result = saved(tmp_path)
    copy = retimed(Path(shutil.copytree(train, tmp_path / "copy")))
    code, _, err = report(capsys, "--out", out, "--train", copy)
    assert code == 0 and re.search(r"warning: --train: '.*copy' is not the folder as it was", err), err
    assert json.loads((out / "attribution.json").read_text())["data_id"] == TrainingSet.load(copy).identity()
    code, _, err = report(capsys, "--out", out)
    assert code == 0 and err == ""
    # A top image's caption edited: an edit, not a copy; said on every run.
    edited = tmp_path / "edited"
    shutil.copytree(copy, edited)
    lines = (edited / "metadata.jsonl").read_text().splitlines()
    top = int(result.top(1)[0])
    lines[top] = json.dumps({**json.loads(lines[top]), "text": "an edited caption"})
    (edited / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    for extra in (["--train", edited], []):
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # as each run of the command is: the same text said again
            code, _, err = report(capsys, "--out", out, *extra)
        assert code == 0 and f"the captions of {result.file_names[top]} changed" in err, err


def test_a_result_holding_its_training_folder_moves_with_it(tmp_path, capsys):
    run = tmp_path / "run"
    train = tiny.build_train(run / "train", n=N, seed=fresh_seed("data"))
    result = made(train)
    result.save(run, train_dir=train)
    assert json.loads((run / "attribution.json").read_text())["train_dir"] == "train"
    moved = run.rename(tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        back = Attribution.load(moved)
    assert back.metadata["train_dir"] == str((moved / "train").resolve()) and back.top().tolist() == result.top(
        3).tolist()
    code, _, err = report(capsys, "--out", moved, "--topk", 4)
    assert code == 0 and err == ""
    # Results that record the folder's absolute path are read as before.
    rec = json.loads((moved / "attribution.json").read_text())
    (moved / "attribution.json").write_text(json.dumps({**rec, "train_dir": str((moved / "train").resolve())}))
    assert Attribution.load(moved).file_names == result.file_names


def test_a_result_saved_without_its_folder_is_read_back_when_told(tmp_path, capsys):
    train = tiny.build_train(tmp_path / "train", n=N, seed=fresh_seed("data"))
    result = made(train)
    with pytest.warns(UserWarning, match=r"^train_dir: none given and the result records none, so gallery\.png and "
                                         r"report\.html show no training images"):
        result.save(tmp_path / "out")
    raises("out", r"lacks train_dir, data_id; .*pass the training folder it was made from", Attribution.load,
           tmp_path / "out")
    with pytest.warns(UserWarning, match=r"^train_dir: the result records no identity of the training folder"):
        back = Attribution.load(tmp_path / "out", train_dir=train)
    np.testing.assert_array_equal(back.scores, result.scores)
    fewer = tiny.build_train(tmp_path / "fewer", n=N - 2)
    raises("train_dir", rf"holds {N - 2} images, not the {N} this result scored; pass the training folder",
           Attribution.load, tmp_path / "out", train_dir=fewer)
    with pytest.warns(UserWarning, match="records no identity"):
        assert redraw(tmp_path / "out", train_dir=train)[1] == 3
    code, _, err = report(capsys, "--out", tmp_path / "out")  # recorded by the report told the folder
    assert code == 0 and err == ""
    assert (tmp_path / "out" / "report.html").read_text().count("<img") == 4  # the query and the top 3


def test_a_loaded_result_saves_with_the_folder_it_records(tmp_path):
    out, train, _ = saved(tmp_path, k=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Attribution.load(out).save(tmp_path / "copy")
    rec = json.loads((tmp_path / "copy" / "attribution.json").read_text())
    assert rec["train_dir"] == str(train.resolve()) and rec["data_id"] == TrainingSet.load(train).identity()
    assert (tmp_path / "copy" / "report.html").read_text().count("<img") == 5
    shutil.rmtree(train)
    back = Attribution(np.arange(N, dtype=float), np.zeros((N, 1)), "p", torch.zeros(1, 8, 8),
                       [f"{i:03d}.png" for i in range(N)], [["c"]] * N, {"train_dir": str(train)})
    raises("train_dir", r"records the training folder '.*train', which is not a folder here; pass where it is now",
           back.save, tmp_path / "never")
    assert not (tmp_path / "never").exists()


# --- what the folder holds, checked as it is read back -----------------------------------------------------
def test_scores_of_another_result_are_refused(tmp_path, capsys):
    out, _, _ = saved(tmp_path, seed=fresh_seed("first"))
    other, _, _ = saved(tmp_path, "other", seed=fresh_seed("second"))
    shutil.copy(other / "scores.npy", out / "scores.npy")
    raises("out", r"scores\.npy' does not hold the scores attribution\.json ranks \(#1, .*\); it is damaged or from "
                  r"another result: put back this result's own scores\.npy", Attribution.load, out)
    before = snapshot(out)
    code, _, err = report(capsys, "--out", out)
    assert code == 2 and "error: --out: " in err and "scores.npy' does not hold" in err
    assert snapshot(out) == before


@pytest.mark.parametrize("name, make, says", [
    ("scores.npy", lambda s, t: s[:-1], rf"scores\.npy' holds {N - 1} scores but attribution\.json records {N}"),
    ("scores.npy", lambda s, t: s[None], rf"scores\.npy' holds an array of shape \(1, {N}\), not one score"),
    ("scores.npy", lambda s, t: np.array(["x"] * len(s)), r"scores\.npy' holds values of dtype <U1, not scores"),
    ("tau.npy", lambda s, t: t[:, 0], rf"tau\.npy' holds an array of dtype float64 and shape \({N},\), not "
                                      rf"\[{N}, versions\]"),
    ("tau.npy", lambda s, t: t[1:], rf"tau\.npy' holds .*shape \({N - 1}, 2\)"),
    ("tau.npy", lambda s, t: np.array([["x"]] * len(s)), r"tau\.npy' holds an array of dtype <U1"),
], ids=["short-scores", "2d-scores", "string-scores", "1d-tau", "short-tau", "string-tau"])
def test_damaged_arrays_are_named(tmp_path, name, make, says):
    out, _, result = saved(tmp_path)
    np.save(out / name, make(result.scores, result.tau))
    raises("out", says + r".*; it is damaged or from another result: put back this result's own " + re.escape(name),
           Attribution.load, out)


@pytest.mark.parametrize("field, value, says", [
    ("top", 5, r"top is 5, not a list of the top images"),
    ("top", [{"id": "0", "score": 1.0}], r"an entry of top is .*, not an object with an \"id\" and a \"score\""),
    ("train_dir", 123, r"train_dir is 123, not a folder path"),
    ("prompt", 12345, r"prompt is 12345, not a string"),
    ("n_train", "8", r"n_train is '8', not a count"),
])
def test_fields_of_the_wrong_kind_are_named(tmp_path, field, value, says):
    out, _, _ = saved(tmp_path)
    rec = json.loads((out / "attribution.json").read_text())
    (out / "attribution.json").write_text(json.dumps({**rec, field: value}))
    raises("out", says + r"; the file is damaged: put back the result's own attribution\.json", Attribution.load, out)


# --- scores that are not finite ----------------------------------------------------------------------------
def test_nan_and_infinite_scores_are_ranked_by_rule_and_said_once(tmp_path):
    train = tiny.build_train(tmp_path / "train", n=N, seed=fresh_seed("data"))
    rng = np.random.default_rng(fresh_seed())
    scores = rng.normal(size=N)
    nan, inf = rng.choice(N, size=3, replace=False)[:2], int(rng.choice(N))
    nan = [i for i in nan if i != inf][:2]
    scores[nan], scores[inf] = np.nan, np.inf
    bad = len(nan) + 1
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = made(train, scores=scores, k=N)
        top = result.top(N).tolist()
        result.top_records()
        result.save(tmp_path / "out", train_dir=train)
    notes = [str(w.message) for w in said if str(w.message).startswith("scores:")]
    assert len(notes) == 1 and re.match(rf"scores: {bad} of the {N} scored images have no finite score \("
                                        rf"{len(nan)} NaN, left out of the ranking; 1 \+inf, ranked first", notes[0])
    finite = [i for i in np.argsort(-scores, kind="stable") if np.isfinite(scores[i])]
    assert top == [inf] + finite and not set(nan) & set(top)
    page = (tmp_path / "out" / "report.html").read_text()
    assert (f"{N - bad} of the {N} training images have a finite score; {len(nan)} NaN (left out of the ranking), "
            "1 +inf (ranked first).") in page
    assert f"Score distribution over the {N - bad} training images with a finite score" in page
    with pytest.warns(UserWarning, match=rf"^scores: {bad} of the {N} scored"):
        back = Attribution.load(tmp_path / "out")
    assert back.top().tolist() == top


@pytest.mark.parametrize("value", [np.nan, -np.inf])
def test_a_result_without_a_finite_score_saves_and_reports(tmp_path, capsys, value):
    train = tiny.build_train(tmp_path / "train", n=N, seed=fresh_seed("data"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN ones are said: another test's matter
        result = made(train, scores=np.full(N, value))
        result.save(tmp_path / "out", train_dir=train)
        assert result.top().tolist() == []
        page = (tmp_path / "out" / "report.html").read_text()
        assert f"0 of the {N} training images have a finite score" in page and "No finite score to show" in page
        code, _, err = report(capsys, "--out", tmp_path / "out")
    assert code == 0, err


def test_images_outside_a_scored_subset_are_not_said(tmp_path):
    train = tiny.build_train(tmp_path / "train", n=N, seed=fresh_seed("data"))
    scores = np.full(N, -np.inf)
    scores[[1, 4]] = [0.5, 0.25]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = made(train, scores=scores, n_scored=2)
    assert result.top().tolist() == [1, 4]
    scores[6] = -np.inf  # already: n_scored 3 says one of the -inf is a score
    with pytest.warns(UserWarning, match=r"^scores: 1 of the 3 scored images have no finite score \(1 -inf, ranked "
                                         r"last"):
        made(train, scores=scores, n_scored=3)


# --- arguments of the wrong kind -----------------------------------------------------------------------
def test_arguments_of_the_wrong_kind_are_named(tmp_path):
    train = tiny.build_train(tmp_path / "train", n=N, seed=fresh_seed("data"))
    data = TrainingSet.load(train)
    parts = {"scores": np.zeros(N), "tau": np.zeros((N, 1)), "prompt": "a red dot", "query": torch.zeros(1, 8, 8),
             "file_names": data.file_names, "captions": data.captions}
    for change, argument, says in (
            ({"prompt": 12345}, "prompt", r"12345 is an int; give the query's prompt as a string"),
            ({"query": torch.zeros(8, 8)}, "query", r"shape \(8, 8\); give the picture as \[C, H, W\], channels first"),
            ({"query": torch.zeros(1, 1, 8, 8)}, "query", r"for a batch of one, give query\[0\]"),
            ({"query": np.zeros((1, 8, 8), dtype=np.uint8)}, "query", r"dtype torch\.uint8; give floats in \[-1, 1\]"),
            ({"query": "q.png"}, "query", r"a str; give the picture as a tensor"),
            ({"scores": np.array(["a"] * N)}, "scores", r"dtype <U1, not numbers"),
            ({"captions": [3] * N}, "captions", r"3 is not a list of strings"),
            ({"metadata": []}, "metadata", r"a list; give a dict")):
        raises(argument, says, Attribution, **{**parts, **change})
    from_numpy = Attribution(**{**parts, "query": np.full((1, 8, 8), 0.5, dtype=np.float32)})
    assert isinstance(from_numpy.query, torch.Tensor) and torch.equal(from_numpy.query, torch.full((1, 8, 8), 0.5))
    from_numpy.save(tmp_path / "out", train_dir=train)
    for bad in (None, 3):
        raises("out", rf"{bad} is an? \w+; give a folder as a str or path", Attribution.load, bad)
    raises("train_dir", r"123 is an int; give a folder", Attribution.load, tmp_path / "out", train_dir=123)


def test_a_file_given_for_the_result_folder(tmp_path, capsys):
    out, _, _ = saved(tmp_path)
    raises("out", rf"'{re.escape(str(out))}/attribution\.json' is a file; give the folder that holds it "
                  rf"\('{re.escape(str(out))}'\)", Attribution.load, out / "attribution.json")
    raises("out", r"'.*nowhere' does not exist; give the folder a result was saved into", Attribution.load,
           tmp_path / "nowhere")
    code, _, err = report(capsys, "--out", out / "attribution.json")
    assert code == 2 and "error: --out: " in err and "is a file; give the folder that holds it" in err, err
    code, _, err = report(capsys, "--out", tmp_path / "nowhere")
    assert code == 2 and "error: --out: " in err and "does not exist" in err, err


# --- the report ---------------------------------------------------------------------------------------------
def test_report_into_another_folder_leaves_the_result_as_it_is(tmp_path, capsys):
    out, train, _ = saved(tmp_path)
    copy = retimed(Path(shutil.copytree(train, tmp_path / "copy")))
    before = snapshot(out)
    code, printed, err = report(capsys, "--out", out, "--topk", 5, "--train", copy, "--report-dir", tmp_path / "r")
    assert code == 0 and snapshot(out) == before, err
    assert "<td>5</td>" in (tmp_path / "r" / "report.html").read_text() and (tmp_path / "r" / "gallery.png").is_file()
    assert f"rewrote {tmp_path / 'r' / 'gallery.png'} and {tmp_path / 'r' / 'report.html'}" in printed


def test_report_prints_paths_and_captions_as_the_demo_does(tmp_path, capsys):
    train = tiny.build_train(tmp_path / "train", n=N, seed=fresh_seed("data"))
    data = TrainingSet.load(train)
    first = next(i for i, c in enumerate(data.captions) if len(c) > 1 and c[0] != c[-1])
    scores = np.random.default_rng(fresh_seed()).random(N)
    scores[first] = 2.0
    made(train, scores=scores).save(tmp_path / "out", train_dir=train)
    code, printed, _ = report(capsys, "--out", f"{tmp_path / 'out'}/")
    assert code == 0 and "//" not in printed and f"rewrote {tmp_path / 'out' / 'gallery.png'}" in printed
    line = next(line for line in printed.splitlines() if line.strip().startswith("1."))
    assert line.endswith(data.captions[first][-1]), line


def test_a_redrawn_report_keeps_every_setting(tmp_path):
    out, _, _ = saved(tmp_path)
    settings = _settings((out / "report.html").read_text())
    redraw(out, 4)
    again = _settings((out / "report.html").read_text())
    assert again == settings and again["n_train"] == N and "file_names_id" in again


def _settings(page: str) -> dict:
    return json.loads(html.unescape(page.split("<h2>Settings</h2>")[1].split(">", 1)[1].split("</pre>")[0]))


def _img_sizes(page: str) -> list[tuple[int, int, bool]]:
    return [(int(w), int(h), px == " class=px") for w, h, px in
            re.findall(r'<img src="data:[^"]*" width="(\d+)" height="(\d+)"( class=px)?>', page)]


def test_large_pictures_are_shown_small_and_in_their_proportions(tmp_path):
    rng = np.random.default_rng(fresh_seed())
    train = tmp_path / "train"
    train.mkdir()
    width, height, n = 256, 384, 6
    for i in range(n):  # noise: each PNG as large as its pixels
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(train / f"{i}.png")
    (train / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a red dot"}) + "\n"
                                                  for i in range(n)))
    data = TrainingSet.load(train)
    query = torch.from_numpy(rng.random((3, height, width), dtype=np.float32)) * 2 - 1
    result = Attribution(rng.normal(size=n), np.zeros((n, 1)), "a red dot", query, data.file_names, data.captions)
    result.save(tmp_path / "out", train_dir=train, k=n)
    page = (tmp_path / "out" / "report.html").read_text()
    sizes = _img_sizes(page)
    assert len(sizes) == n + 1 and page.count("<img") == n + 1
    for w, h, pixelated in sizes:
        assert max(w, h) == drawing.REPORT_THUMB and abs(w / h - width / height) < 0.02 and not pixelated
    full = (tmp_path / "out" / "query.png").stat().st_size
    assert len(page) < full, (len(page), full)  # thumbnails: the page is smaller than one full-size picture
    canvas = np.asarray(Image.open(tmp_path / "out" / "gallery.png").convert("RGB"))
    tile = drawing.GALLERY_TILE
    side = (tile - round(tile * width / height)) // 2  # white margins left and right of each tall picture
    for n_tile in range(n + 1):
        x = 8 + n_tile * (tile + 8)
        margins = canvas[8:8 + tile, x:x + side], canvas[8:8 + tile, x + tile - side:x + tile]
        assert all((margin == 255).all() for margin in margins)
        assert not (canvas[8:8 + tile, x + side:x + tile - side] == 255).all()


def test_small_pictures_are_enlarged_pixel_for_pixel(tmp_path):
    out, _, _ = saved(tmp_path)
    sizes = _img_sizes((out / "report.html").read_text())
    assert sizes and all((w, h, px) == (drawing.REPORT_THUMB, drawing.REPORT_THUMB, True) for w, h, px in sizes)
