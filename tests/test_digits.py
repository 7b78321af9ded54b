"""Fast checks of the embedded digits model: data, tokenizer, coupled retraining, I/O."""
from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from forgetscore.digits import data as D
from forgetscore.digits import train as T
from forgetscore.threads import torch_threads
from forgetscore.digits.model import ModelConfig, cross_attention_kv_names, load_model
from forgetscore.digits.tokenizer import MAX_LENGTH, build_tokenizer, encode

TINY_MODEL = ModelConfig(block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=4, text_width=16,
                         text_layers=1, text_heads=2, text_intermediate=32)
TINY = T.TrainRecipe(epochs=2, batch_size=64, model=TINY_MODEL)


@pytest.fixture(scope="module")
def data():
    return D.load_data()


@pytest.fixture(scope="module")
def small(data):
    return data.subset(torch.arange(0, 400, 2))  # ids 0, 2, ..., 398: 200 images, 4 slots of 50


def test_dataset(data):
    assert len(data) == 1797 and data.images.shape == (1797, 1, 8, 8)
    assert data.images.min() == -1 and data.images.max() == 1
    assert torch.equal(data.ids, torch.arange(1797))
    vocab = set(D.VOCABULARY)
    for caps, label in zip(data.captions, data.labels.tolist()):
        assert len(caps) == D.NUM_CAPTIONS
        assert caps[0] == f"a handwritten {D.DIGIT_WORDS[label]}"
        assert all(w in vocab for c in caps for w in c.split())
    # tertiles within each class: every attribute level is used by about a third of each class
    for k in range(3):
        for c in range(10):
            counts = torch.bincount(data.attributes[data.labels == c, k], minlength=3)
            assert counts.max() - counts.min() <= 1
    # image-specific: many distinct full descriptions
    assert len({caps[-1] for caps in data.captions}) > 250


def test_captions_deterministic(data):
    D.load_data.cache_clear()
    again = D.load_data()
    assert again.captions == data.captions and torch.equal(again.images, data.images)


def test_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = build_tokenizer()
    texts = ["a thick right slanted wide handwritten three", "A Zebra three", ""]
    ids = encode(tok, texts)
    assert ids.shape == (3, MAX_LENGTH)
    assert ids[1, 2].item() == tok.unk_token_id
    assert ids[2, :2].tolist() == [tok.bos_token_id, tok.eos_token_id]
    tok.save_pretrained(tmp_path)
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        assert torch.equal(encode(cls.from_pretrained(tmp_path), texts), ids)


def test_image_folder(tmp_path, small):
    out = D.write_image_folder(tmp_path / "digits", small.subset(torch.arange(20)))
    lines = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and lines[1]["file_name"] == "00002.png"
    assert lines[1]["label"] == int(small.labels[1]) and lines[1]["text"] == list(small.captions[1])
    assert len(list(out.glob("*.png"))) == 20
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_draws_do_not_depend_on_batch():
    ids = torch.arange(100)
    full = T.example_draws(3, 5, ids, 64)
    part = T.example_draws(3, 5, ids[[7, 42, 99]], 64)
    assert torch.equal(part.noise, full.noise[[7, 42, 99]])
    assert torch.equal(part.timesteps, full.timesteps[[7, 42, 99]])
    assert torch.equal(part.caption_index, full.caption_index[[7, 42, 99]])
    assert torch.equal(part.dropped, full.dropped[[7, 42, 99]])
    many = T.example_draws(3, 5, torch.arange(5000), 1)
    assert 0.08 < many.dropped.float().mean() < 0.12
    assert many.timesteps.min() >= 0 and many.timesteps.max() < 1000
    assert torch.bincount(many.caption_index, minlength=D.NUM_CAPTIONS).min() > 900
    other_epoch = T.example_draws(3, 6, ids, 64)
    assert not torch.equal(other_epoch.noise, full.noise)


def test_batch_plan_exclusion():
    recipe = T.TrainRecipe(epochs=3, batch_size=128)
    full = list(T.batch_plan(recipe, 1797))
    assert len(full) == 45 and {s.full_size for s in full} <= {119, 120}
    for e in range(3):
        ids = torch.cat([s.ids for s in full if s.epoch == e])
        assert torch.equal(ids.sort().values, torch.arange(1797))
    excluded = [5, 17, 1000, 1796]
    less = list(T.batch_plan(recipe, 1797, excluded))
    for a, b in zip(full, less):
        assert a.full_size == b.full_size and a.epoch == b.epoch
        assert torch.equal(a.ids[~torch.isin(a.ids, torch.tensor(excluded))], b.ids)


def test_retrain_bit_for_bit_and_exclusion(small, tmp_path):
    a = T.train(TINY, data=small)
    b = T.train(TINY, data=small, exclude_ids=[])
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ta, tb = a.text_encoder.state_dict(), b.text_encoder.state_dict()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    c = T.train(TINY, data=small, exclude_ids=[4, 10])
    sc = c.unet.state_dict()
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert c.info["excluded_ids"] == [4, 10] and c.info["n_train"] == 198
    # save / load round trip
    a.save(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    sl = loaded.unet.state_dict()
    assert all(torch.equal(sa[k], sl[k]) for k in sa)
    assert len(cross_attention_kv_names(loaded.unet)) > 0
    assert loaded.info["recipe_hash"] == TINY.hash()


def test_exclusion_keeps_other_gradients(small):
    """One slot's gradient with K images removed = full gradient minus theirs."""
    from forgetscore.digits.model import build_model

    model = build_model(TINY_MODEL, 0)
    tokens, empty = T.caption_tokens(model, small)

    def grad(ids, full_size):
        model.unet.zero_grad()
        rows = torch.searchsorted(small.ids, ids)
        dr = T.example_draws(0, 0, ids, 64)
        tok = torch.where(dr.dropped[:, None], empty[None], tokens[rows, dr.caption_index])
        with torch.no_grad():
            enc = model.text_encoder(tok).last_hidden_state
        from forgetscore.kernels import reference as R

        a, b = R.noise_coefficients(model.scheduler.alphas_cumprod, dr.timesteps)
        x = (a[:, None] * small.images.reshape(len(small), -1)[rows] + b[:, None] * dr.noise).view(-1, 1, 8, 8)
        pred = model.unet(x, dr.timesteps, enc).sample.reshape(len(ids), -1)
        ((pred - dr.noise).square().mean(1).sum() / full_size).backward()
        return torch.cat([p.grad.flatten() for p in model.unet.parameters()])

    slot = next(iter(T.batch_plan(TINY, small.ids)))
    with torch_threads(1):
        g_full = grad(slot.ids, slot.full_size)
        g_rest = grad(slot.ids[2:], slot.full_size)
        g_two = grad(slot.ids[:2], slot.full_size)
    assert torch.allclose(g_full, g_rest + g_two, atol=1e-6, rtol=1e-4)


def test_samples_and_digit_accuracy(small, tmp_path):
    """The accuracy check samples as the queries are made, and lays its seeds out as documented."""
    import numpy as np

    from forgetscore.attribution.generate import generate
    from forgetscore.attribution.model import DiffusionModel
    from forgetscore.digits.classifier import digit_accuracy, get_classifier

    T.train(TINY, data=small).save(tmp_path / "m")
    model = DiffusionModel.load(tmp_path / "m")
    x = generate(model, ["a handwritten three", "a thick handwritten one"], [0, 1], steps=4, guidance_scale=1.5)
    assert x.shape == (2, 1, 8, 8) and bool(torch.isfinite(x).all())
    alone = generate(model, ["a thick handwritten one"], [1], steps=4, guidance_scale=1.5)
    assert torch.allclose(x[1], alone[0], atol=1e-5)  # a sample does not depend on its batch

    acc = digit_accuracy(tmp_path / "m", n_per_digit=2, seed=5, steps=4, guidance_scale=1.5)
    prompts = [f"a handwritten {w}" for w in D.DIGIT_WORDS for _ in range(2)]
    images = model.decode(generate(model, prompts, [5, 6] * 10, steps=4, guidance_scale=1.5))
    assert torch.allclose(acc["images"], images, atol=1e-5)
    pred = get_classifier(8).predict(images).reshape(10, 2)
    assert np.array_equal(acc["predictions"], pred)
    assert acc["accuracy"] == pytest.approx(float(np.mean(pred == np.arange(10)[:, None])))
    assert list(acc["per_digit"]) == list(D.DIGIT_WORDS)


def test_uncoupled_plan_shifts_everything_coupled_plan_does_not():
    recipe = T.TrainRecipe(epochs=2, batch_size=64)
    ids = torch.arange(300)
    full = list(T.uncoupled_steps(recipe, ids, [], 4, 1000))
    again = list(T.uncoupled_steps(recipe, ids, [], 4, 1000))
    assert all(torch.equal(a.ids, b.ids) and torch.equal(da.noise, db.noise) for (a, da), (b, db) in zip(full, again))
    assert len(full) == 2 * 5 and sum(len(s.ids) for s, _ in full) == 600
    less = list(T.uncoupled_steps(recipe, ids, [7], 4, 1000))
    assert sum(len(s.ids) for s, _ in less) == 598
    # the draws of an image that stays are no longer its draws in the full run
    def draws_of(steps, image):
        return [d.noise[(s.ids == image).nonzero()[0, 0]] for s, d in steps if bool((s.ids == image).any())]
    kept = int(ids[ids != 7][0])
    assert not all(torch.equal(a, b) for a, b in zip(draws_of(full, kept), draws_of(less, kept)))
    coupled_full = list(T.coupled_steps(recipe, ids, [], 4, 1000))
    coupled_less = list(T.coupled_steps(recipe, ids, [7], 4, 1000))
    assert all(torch.equal(a, b) for a, b in zip(draws_of(coupled_full, kept), draws_of(coupled_less, kept)))


def test_uncoupled_training_is_deterministic(small):
    a = T.train(TINY, data=small, coupled=False)
    b = T.train(TINY, data=small, coupled=False, exclude_ids=[])
    assert all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()))
    c = T.train(TINY, data=small)
    assert not all(torch.equal(x, y) for x, y in zip(a.unet.state_dict().values(), c.unet.state_dict().values()))
    assert a.info["coupled"] is False and c.info["coupled"] is True
