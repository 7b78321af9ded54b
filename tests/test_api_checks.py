"""The Python API's checks of its arguments: integer ids and counts (numpy integers too, never bools or floats),
seeds reported as given, a named Fisher file of another sample count, and clear errors for arguments of the
wrong kind (a ValueError that names the argument and says how to fix it)."""
import json
import warnings

import numpy as np
import pytest
import torch

import tiny
from checks import raises
from forgetscore.attribution import (Attributor, ScoringPlan, UnlearnConfig, compute_fisher, generate, preset,
                                     run_fisher)

N = 6
PLAN = ScoringPlan(timesteps=(5, 500), flips=False)
CONFIG = UnlearnConfig(draws=4, micro_batch=4, damping=0.1)
FISHER_SAMPLES = 8
QUERY = torch.zeros(1, 8, 8)

pytestmark = pytest.mark.usefixtures("one_thread")


dirs, model, train = tiny.folder_fixtures(N)


@pytest.fixture(scope="module")
def att(model, train, tmp_path_factory):
    return Attributor(model, train, plan=PLAN, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


# --- image ids ----------------------------------------------------------------------------------
def test_indices_must_be_integer_ids(att):
    """A boolean mask read as ids would score images 0 and 1; floats would be cut to other images."""
    attribute = att.attribute
    raises("indices", r"booleans \(a mask\?\), not image ids; give integer image ids .*np\.flatnonzero", attribute,
           QUERY, "a red dot", config=CONFIG, indices=np.arange(N) < 3)
    raises("indices", r"booleans", attribute, QUERY, "a red dot", config=CONFIG, indices=[True, False, True])
    raises("indices", r"booleans", attribute, QUERY, "a red dot", config=CONFIG, indices=[2, True])
    raises("indices", r"booleans", attribute, QUERY, "a red dot", config=CONFIG,
           indices=torch.arange(N) < 3)
    raises("indices", r"dtype float64, not image ids; give integer image ids", attribute, QUERY, "a red dot",
           config=CONFIG, indices=np.array([1.7, 3.2]))
    raises("indices", r"dtype float64", attribute, QUERY, "a red dot", config=CONFIG, indices=[1, 3.0])
    raises("indices", r"give integer image ids", attribute, QUERY, "a red dot", config=CONFIG, indices=["1", "3"])
    raises("indices", r"shape \(1, 2\); give a flat list", attribute, QUERY, "a red dot", config=CONFIG,
           indices=np.array([[1, 2]]))
    raises("indices", r"empty", attribute, QUERY, "a red dot", config=CONFIG, indices=np.array([], dtype=np.int64))
    raises("indices", rf"need ids in \[0, {N}\)", attribute, QUERY, "a red dot", config=CONFIG,
           indices=np.array([1, 2 ** 64 - 1], dtype=np.uint64))
    raises("indices", r"booleans", att.attribute_many, [(QUERY, "a red dot")], config=CONFIG,
           indices=np.ones(N, dtype=bool))


def test_numpy_integers_serve_as_ints_and_are_recorded_as_ints(att, tmp_path):
    """k, fisher_samples, ids and box corners from numpy arrays: the same result as Python ints, saved as JSON."""
    got = att.attribute(QUERY, "a red dot", k=np.int64(2), config=CONFIG, fisher_samples=np.int64(FISHER_SAMPLES),
                        indices=np.array([4, 0, 2], dtype=np.int32), region=np.array([0, 0, 4, 4]))
    want = att.attribute(QUERY, "a red dot", k=2, config=CONFIG, fisher_samples=FISHER_SAMPLES,
                         indices=[0, 2, 4], region=(0, 0, 4, 4))
    np.testing.assert_array_equal(got.scores, want.scores)
    assert got.top().tolist() == want.top().tolist() and len(got.top()) == 2
    assert set(np.flatnonzero(np.isfinite(got.scores)).tolist()) == {0, 2, 4}
    assert got.metadata["region"] == [0, 0, 4, 4] and got.metadata["fisher_samples"] == FISHER_SAMPLES
    out = got.save(tmp_path / "out")
    rec = json.loads((out / "attribution.json").read_text())
    assert rec["region"] == [0, 0, 4, 4] and rec["fisher_samples"] == FISHER_SAMPLES


def test_counts_take_numpy_integers_but_not_bools_or_floats(att, model, train, tmp_path):
    want = att.fisher(FISHER_SAMPLES)
    got = att.fisher(np.int64(FISHER_SAMPLES), batch_size=np.int32(4), chunk_size=np.int64(4))
    assert got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert att.fisher_samples(np.int64(FISHER_SAMPLES)) == FISHER_SAMPLES
    raises("samples", r"True must be an int >= 1", att.fisher, True)
    raises("samples", r"must be an int >= 1", att.fisher, np.bool_(True))
    raises("samples", r"10\.0 must be an int >= 1", att.fisher, 10.0)
    for k in (np.bool_(True), np.float64(3.0)):
        raises("k", r"must be an int >= 1", att.attribute, QUERY, "a red dot", k=k, config=CONFIG)
    sized = Attributor(model, train, plan=PLAN, cache_dir=tmp_path, progress=False, batch_size=np.int64(16),
                       chunk_size=np.int64(4), fisher_batch_size=np.int64(4), fisher_chunk_size=np.int64(4))
    assert (sized.batch_size, sized.chunk_size, sized.fisher_batch_size, sized.fisher_chunk_size) == (16, 4, 4, 4)
    assert all(type(v) is int for v in (sized.batch_size, sized.chunk_size, sized.fisher_batch_size))
    raises("batch_size", r"must be an int >= 1 or 'auto'", Attributor, model, train, cache_dir=tmp_path,
           batch_size=16.0)
    config = UnlearnConfig(steps=np.int64(2), draws=np.int32(4), micro_batch=np.int64(4), seed=np.uint64(3),
                           n_train=np.int64(7))
    assert config == UnlearnConfig(steps=2, draws=4, micro_batch=4, seed=3, n_train=7)
    json.dumps(config.to_dict())  # no numpy scalar left in what results record
    raises("seed", r"must be an integer >= 0 and < 2\*\*64", UnlearnConfig, seed=2 ** 64)


# --- seeds --------------------------------------------------------------------------------------
def test_a_bad_seed_is_reported_as_given(att):
    """The seeds are mixed with stream constants; an error must show the number the user passed."""
    raises("seed", r"^seed: -1 is outside \[0, 2\*\*64\)", att.generate, "a red dot", seed=-1)
    raises("seed", r"^seed: 18446744073709551616 is outside", att.generate, "a red dot", seed=2 ** 64)
    raises("seed", r"^seed: -1 is outside \[0, 2\*\*64\)", att.fisher, FISHER_SAMPLES, seed=-1)
    raises("seed", r"expected an int, got float", att.fisher, FISHER_SAMPLES, seed=1.0)
    data = att.prepare()
    raises("seed", r"^seed: -3 is outside", compute_fisher, att.model, data, att.names, samples=2, seed=-3)
    raises("seed", r"^seed: -3 is outside", run_fisher, att.model, data, att.names, att.cache_dir / "never",
           samples=2, seed=-3)
    assert not (att.cache_dir / "never").exists()
    raises("seed", r"^seed: -2 is outside", generate, att.model, ["a", "b"], [1, -2], steps=1)
    raises("steps", r"0 must be an int >= 1", att.generate, "a red dot", steps=0)
    torch.testing.assert_close(att.generate("a red dot", seed=np.int64(3), steps=2),
                               att.generate("a red dot", seed=3, steps=2), rtol=0, atol=0)


# --- a named Fisher file ------------------------------------------------------------------------
def test_a_named_fisher_file_of_another_sample_count_is_refused(att, tmp_path):
    """As the cache never serves another count for a count asked for; the user's file is left as it is."""
    path = tmp_path / "f.safetensors"
    made = att.fisher(FISHER_SAMPLES, path=path)
    before = path.read_bytes()
    raises("samples", rf"12, but path '.*f\.safetensors' holds a Fisher of {FISHER_SAMPLES} samples; pass "
           rf"samples={FISHER_SAMPLES} \(or None\) to use it, or another path", att.fisher, 12, path=path)
    raises("samples", r"holds a Fisher of", att.fisher, np.int64(12), path=str(path))
    assert path.read_bytes() == before
    for samples in (None, FISHER_SAMPLES):
        got = att.fisher(samples, path=path)
        assert all(torch.equal(got[n], made[n]) for n in made)
    # A path with no file yet: computed with the count asked for.
    other = att.fisher(4, path=tmp_path / "g.safetensors")
    assert any(not torch.equal(other[n], made[n]) for n in made)
    raises("samples", r"holds a Fisher of 4 samples", att.fisher, FISHER_SAMPLES, path=tmp_path / "g.safetensors")


# --- arguments of the wrong kind ----------------------------------------------------------------
def test_weights_must_be_one_string(model, train, tmp_path):
    raises("weights", r"expected one string, a preset \['kv', .*got list; for several patterns join them with '\|'",
           Attributor, model, train, cache_dir=tmp_path, weights=["kv"])
    raises("weights", r"got NoneType", Attributor, model, train, cache_dir=tmp_path, weights=None)


def test_attribute_many_takes_query_prompt_pairs(att, dirs):
    query = str(dirs[1] / "000.png")
    raises("queries", r"item 0 is '.*000\.png', not a \(query, prompt\) pair; pass e\.g\.", att.attribute_many,
           [query], config=CONFIG)
    raises("queries", r"item 1 is a tuple of 3, not a \(query, prompt\) pair", att.attribute_many,
           [(query, "a red dot"), (query, "a", "b")], config=CONFIG)
    raises("queries", r"item 0 is 'ab', not a", att.attribute_many, ["ab"], config=CONFIG)
    raises("queries", r"empty; give at least one \(query, prompt\) pair", att.attribute_many, [], config=CONFIG)
    raises("queries", r"expected a list of \(query, prompt\) pairs, got str; for one query use attribute",
           att.attribute_many, query, config=CONFIG)
    raises("queries", r"got Tensor", att.attribute_many, QUERY, config=CONFIG)


def test_preset_overrides_must_be_settings():
    msg = raises("drawz", r"not a setting of UnlearnConfig; use one of \['steps', 'alpha', 'draws'", preset,
                 "mscoco", drawz=8)
    assert "micro_batch" in msg and "damping" in msg
    assert preset("mscoco", draws=8).draws == 8


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_an_empty_prompt_is_refused(att, prompt):
    """As the CLI refuses an empty --prompt."""
    raises("prompt", r"is empty; give the text", att.attribute, QUERY, prompt, config=CONFIG)
    raises("prompt", r"is empty", att.attribute_many, [(QUERY, "a red dot"), (QUERY, prompt)], config=CONFIG)
    raises("prompt", r"is empty", att.unlearn, QUERY, prompt, CONFIG)
    raises("prompt", r"is empty", att.query_loss, QUERY, prompt)


# --- regions ------------------------------------------------------------------------------------
def test_region_mask_as_a_numpy_array(att):
    ramp = np.linspace(0, 1, 64).reshape(8, 8)
    torch.testing.assert_close(att.region_mask(ramp), att.region_mask(torch.from_numpy(ramp).float()))
    torch.testing.assert_close(att.region_mask(np.ones((8, 8))), att.region_mask(torch.ones(8, 8)))
    mask = np.zeros((8, 8), dtype=bool)
    mask[:4, :4] = True
    torch.testing.assert_close(att.region_mask(mask), att.region_mask((0, 0, 4, 4)))
    raises("region", r"mask shape \(4, 4\) is not the image's \(8, 8\)", att.region_mask, np.ones((4, 4)))
    raises("region", r"selects no pixel", att.region_mask, np.zeros((8, 8)))
    raises("region", r"holds NaN or inf", att.region_mask, np.full((8, 8), np.nan))
    raises("region", r"dtype <U1; give numbers or bools", att.region_mask, np.full((8, 8), "a"))


@pytest.mark.parametrize("box", [(0.5, 0, 4.9, 4), (0, 0, 4.0, 4), (0, 0, True, 4), np.array([0.0, 0, 4, 4]),
                                 ("0", "0", "4", "4")])
def test_region_box_corners_must_be_integers(att, box):
    """A fractional corner would be cut silently while the result recorded the corners given."""
    raises("region", r"is not an integer; give the box x0,y0,x1,y1 in whole pixels", att.region_mask, box)
    raises("region", r"is not an integer", att.attribute, QUERY, "a red dot", config=CONFIG, region=box)


def test_region_box_of_numpy_integers(att):
    want = att.region_mask((0, 0, 4, 4))
    for box in ([np.int64(0), np.int32(0), np.uint8(4), np.int16(4)], np.array([0, 0, 4, 4])):
        torch.testing.assert_close(att.region_mask(box), want)
    raises("region", r"'0,0,4,4' is neither a box", att.region_mask, "0,0,4,4")
    raises("region", r"3 is neither a box", att.region_mask, 3)


def test_scores_at_the_rounding_of_the_losses_are_pointed_out(tmp_path, rng):
    from forgetscore.attribution.results import rounding_note

    g = np.random.default_rng(int(torch.randint(0, 2 ** 31, (1,), generator=rng)))
    assert rounding_note(g.normal(size=200) * 1e-4) is None  # losses that rose: every score its own
    quantised = g.integers(-3, 4, size=200) * 2.0 ** -24
    assert "take only 7 distinct values over 200 images" in rounding_note(quantised, "q")
    assert rounding_note(quantised[:40]) is None  # too few images to tell
    with_subset = np.concatenate([quantised, np.full(100, -np.inf)])  # images outside a subset do not count
    assert "over 200 images" in rounding_note(with_subset)
    # Distinct, but at the rounding of the losses: 0.5 has float32 rounding units of 2**-24.
    before = 0.5 + g.normal(size=(200, 2)) * 1e-3
    tiny_rise = g.normal(size=200) * 2.0 ** -24
    units = np.quantile(np.abs(tiny_rise), 0.9) / (np.median(np.abs(before)) * 2.0 ** -23)
    assert np.unique(tiny_rise).size == 200 and rounding_note(tiny_rise) is None
    assert f"reach only {units:.2g} float32 rounding units of the losses" in rounding_note(tiny_rise, "q", before)
    assert rounding_note(tiny_rise * 400, before=before) is None  # far above the rounding: a ranking
    assert "reach only" in rounding_note(np.concatenate([tiny_rise, np.full(9, -np.inf)]), before=before)

    # End to end: a step far below float32's resolution leaves the weights, and so the losses, as they were.
    model_dir = tiny.build_model(tmp_path / "model")
    att = Attributor.load(model_dir, tiny.build_train(tmp_path / "train", n=60), plan=PLAN,
                          cache_dir=tmp_path / "cache", progress=False)
    query = torch.rand(1, 8, 8, generator=rng) * 2 - 1
    with pytest.warns(UserWarning, match=r"^scores: those of the query (reach only|take only \d+ distinct)"):
        att.attribute(query, "a red square", config=UnlearnConfig(method="sgd", alpha=1e-30, draws=4, micro_batch=4))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="scores:")  # a step that moves the losses says nothing
        result = att.attribute(query, "a red square",
                               config=UnlearnConfig(method="sgd", alpha=0.1, draws=4, micro_batch=4))
    assert np.unique(result.scores).size == 60


def test_the_cost_of_a_precision_is_said_once(model, train, tmp_path):
    import warnings

    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        att = Attributor(model, train, plan=PLAN, cache_dir=tmp_path / "c", precision="fp16", progress=False)
        att.sweep()
    assert [str(w.message)[:40] for w in said] == ["precision: fp16 on the CPU runs several "]


def test_each_result_of_attribute_many_has_its_own_metadata(att):
    first, second = att.attribute_many([(QUERY, "a red dot"), (QUERY + 0.5, "a blue line")], config=CONFIG)
    first.metadata["plan"]["seed"] = 12345
    first.metadata["unlearn"]["alpha"] = 1.0
    assert second.metadata["plan"]["seed"] == att.plan.seed and second.metadata["unlearn"]["alpha"] == CONFIG.alpha


def test_a_query_list_names_a_query_by_its_file_stem_as_a_folder_name(tmp_path):
    from forgetscore.query_list import read_queries

    names = ("my query.png", "été #2.png", "..hidden.png", "%%.png")
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.jsonl").write_text("".join(json.dumps({"query": n, "prompt": "p"}) + "\n" for n in names))
    assert [s.name for s in read_queries(tmp_path / "list.jsonl")] == ["my_query", "t___2", "hidden", "query"]


def test_words_the_tokenizer_does_not_know_are_named(att, model):
    assert model.unknown_words("a red dot") == [] and model.unknown_words("a red zebra 7") == ["zebra", "7"]
    with pytest.warns(UserWarning, match=r"^prompt: the model's tokenizer does not know 'zebra' of 'a red zebra': "):
        att.attribute(QUERY, "a red zebra", config=CONFIG)


def test_a_prompt_names_each_unknown_word_once_and_says_how_much_is_cut_off(att, model):
    assert model.unknown_words("zebra a zebra red 7 zebra") == ["zebra", "7"]
    words = tiny.WORDS[:model.max_length]  # with <bos> and <eos>: two tokens more than the encoder reads
    assert model.cut_tokens(" ".join(words[:model.max_length - 2])) == 0
    assert model.cut_tokens(" ".join(words)) == 2
    prompt = " ".join(words[:model.max_length - 3] + ["zebra"] * 3)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        att.attribute(QUERY, prompt, config=CONFIG)
    said = [str(w.message) for w in said if str(w.message).startswith("prompt:")]
    assert said == [f"prompt: the model's tokenizer does not know 'zebra' of {prompt!r}: read as its unknown token, "
                    "they say nothing of the picture; use the words of the training captions",
                    f"prompt: {prompt!r} is {model.max_length + 2} tokens long but the model's text encoder reads "
                    f"{model.max_length}: the last 2 are dropped and say nothing of the picture; shorten it"]
