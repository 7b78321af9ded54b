"""The attribution engine against a brute-force version written plainly here."""
import copy
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

import tiny
from forgetscore import kernels
from forgetscore.attribution import Attributor, DiffusionModel, ScoringPlan, UnlearnConfig
from forgetscore.attribution import fisher as fisher_mod
from forgetscore.attribution import unlearning as unlearn_mod
from forgetscore.attribution import params


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return tiny.build_model(root / "model"), tiny.build_train(root / "train", n=9)


PLAN = ScoringPlan(timesteps=(3, 250, 700, 999), captions="all", flips=True, seed=11)
# alpha: the nine-image set makes alpha / N large; at 0.05 the two steps moved some weights ~50 times their own size,
# where the last bits of a backward pass decide the result. Here the losses still move by up to ~1e-2.
CONFIG = UnlearnConfig(steps=2, alpha=1e-4, draws=6, micro_batch=4, damping=0.1, seed=5)


def _attributor(dirs, cache, **kw):
    model_dir, train_dir = dirs
    kw.setdefault("plan", PLAN)
    return Attributor.load(model_dir, train_dir, cache_dir=cache, progress=False, **kw)


def _mse(model, unet, x0, ctx, t, seed, sid, did):
    acp = model.alphas_cumprod
    eps = kernels.normal(seed, [sid], [did], x0.shape, backend="torch")[0].double()
    a, b = acp[t].sqrt(), (1 - acp[t]).sqrt()
    x_t = (a * x0.double() + b * eps).float()
    out = unet(x_t[None], torch.tensor([t]), encoder_hidden_states=ctx[None]).sample[0].double()
    target = eps if model.prediction_type == "epsilon" else a * eps - b * x0.double()
    return ((out - target) ** 2).mean()


def _brute_losses(model, unet, train, plan):
    """[n, versions] losses, one UNet call per (image, version, caption, timestep)."""
    out = np.zeros((len(train), plan.versions))
    with torch.no_grad():
        for i in range(len(train)):
            img = train.load_pixels(i, model.image_shape)
            caps = train.captions[i] if plan.captions == "all" else train.captions[i][:1]
            for v in range(plan.versions):
                x0 = img.flip(-1) if v else img
                vals = [_mse(model, unet, x0, model.encode_text([c])[0], t, plan.seed, i,
                             ScoringPlan.draw_id(v, ci, t)).item()
                        for ci, c in enumerate(caps) for t in plan.timesteps]
                out[i, v] = np.mean(vals)
    return out


def _brute_unlearn(model, names, fisher, x0, ctx, config, n):
    unet = copy.deepcopy(model.unet)
    ps = dict(unet.named_parameters())
    for step in range(config.steps):
        grads = {nm: torch.zeros_like(ps[nm], dtype=torch.float64) for nm in names}
        for micro, lo in enumerate(range(0, config.draws, config.micro_batch)):
            count = min(config.micro_batch, config.draws - lo)
            ts = unlearn_mod._timesteps(config.seed, step, micro, count, 1000)
            for j in range(count):
                for p in ps.values():
                    p.grad = None
                    p.requires_grad_(True)
                loss = _mse(model, unet, x0, ctx, int(ts[j]), config.seed ^ unlearn_mod.QUERY_STREAM, 0,
                            step * config.draws + lo + j)
                loss.backward()
                for nm in names:
                    grads[nm] += ps[nm].grad.double()
        with torch.no_grad():
            for nm in names:
                f = fisher[nm].double()
                ps[nm] += ((config.alpha / n) * (grads[nm] / config.draws) / (f + config.damping * f.mean())).float()
    return unet


def test_scores_equal_brute_force(tiny_dirs, tmp_path):
    att = _attributor(tiny_dirs, tmp_path / "cache")
    model, train = att.model, att.train
    query = torch.rand(1, 8, 8) * 2 - 1
    prompt = "a red square"
    result = att.attribute(query, prompt, k=3, config=CONFIG, fisher_samples=12)

    fisher = att.fisher(12)
    unet_after = _brute_unlearn(model, att.names, fisher, query, model.encode_text([prompt])[0], CONFIG, len(train))
    before = _brute_losses(model, model.unet, train, PLAN)
    after = _brute_losses(model, unet_after, train, PLAN)
    tau = after - before
    np.testing.assert_allclose(result.tau, tau, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(result.scores, tau.max(axis=1), rtol=1e-4, atol=1e-7)
    assert list(result.top(3)) == list(np.argsort(-tau.max(axis=1), kind="stable")[:3])


class _Twice(torch.nn.Module):
    """A layer run twice in one forward pass (shared weights): a sample's gradient sums both calls'."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) + 0.5 * self.inner(x)


def _bias_kv(unet: torch.nn.Module) -> int:
    """Gives every cross-attention key/value projection a bias, as some models have; how many there are."""
    kv = [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    for name in kv:
        parent, child = name.rsplit(".", 1)
        old = unet.get_submodule(name)
        new = torch.nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            new.bias.uniform_(-0.5, 0.5)
        setattr(unet.get_submodule(parent), child, new.requires_grad_(False))
    return len(kv)


@pytest.mark.parametrize("weights", ["cross-attn", "all", "all, one layer twice", "kv, with biases"])
def test_fisher_equals_per_sample_gradients(tiny_dirs, tmp_path, weights):
    att = _attributor(tiny_dirs, tmp_path / "cache", weights=weights.split(",")[0])
    if weights.endswith("biases"):  # the preset takes them too, as the published code's name match does
        count = _bias_kv(att.model.unet)
        att.names = params.select(att.model.unet, "kv")
        assert len(att.names) == 2 * count and sum(n.endswith("bias") for n in att.names) == count
    if weights.endswith("twice"):
        block = att.model.unet.down_blocks[-1].attentions[0].transformer_blocks[0]
        block.attn1.to_out[0] = _Twice(block.attn1.to_out[0])
        att.names = [n for n, _ in att.model.unet.named_parameters()]
        assert any(".to_out.0.inner." in n for n in att.names)
    data = att.prepare()
    samples = 7
    got = att.fisher(samples, batch_size=3)
    model = att.model
    draws = fisher_mod.sample_draws(0, 0, samples, data, 1000, True)
    ps = dict(model.unet.named_parameters())
    want = {n: torch.zeros_like(ps[n], dtype=torch.float64) for n in att.names}
    for s in range(samples):
        i, v = int(draws["image"][s]), int(draws["version"][s])
        x0 = att.train.load_pixels(i, model.image_shape)
        x0 = x0.flip(-1) if v else x0
        ctx = model.encode_text([att.train.captions[i][int(draws["caption"][s])]])[0]
        for n in att.names:
            ps[n].requires_grad_(True)
            ps[n].grad = None
        _mse(model, model.unet, x0, ctx, int(draws["timestep"][s]), 0 ^ fisher_mod.FISHER_STREAM, s, 1).backward()
        for n in att.names:
            want[n] += ps[n].grad.double() ** 2
            ps[n].requires_grad_(False)
    assert any(n.endswith(".bias") for n in att.names)  # to_out.0.bias: the bias path is checked too
    if weights.startswith("all"):  # every kind of layer of the UNet is in the Fisher
        kinds = {type(m) for n, m in model.unet.named_modules() if any(p.startswith(f"{n}.") for p in att.names)}
        assert {torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm} <= kinds
    for n in att.names:
        torch.testing.assert_close(got[n], want[n] / samples, rtol=1e-4, atol=1e-14 + 1e-6 * float(want[n].max()),
                                   msg=lambda m, n=n: f"{n}: {m}")


def test_scores_do_not_depend_on_batching_order_or_subsets(tiny_dirs, tmp_path):
    att = _attributor(tiny_dirs, tmp_path / "cache", batch_size=500)
    weights = att.unlearn(torch.rand(1, 8, 8), "a blue circle", CONFIG, fisher_samples=12)
    full = att.sweep().run([None, weights], progress=False)
    for batch_size in (5, 33):
        small = _attributor(tiny_dirs, tmp_path / "cache", batch_size=batch_size)
        np.testing.assert_allclose(small.sweep().run([None, weights], progress=False), full, rtol=1e-6, atol=1e-9)
    order = np.array([5, 0, 8, 3])
    np.testing.assert_allclose(att.sweep().run([weights], order, progress=False)[0], full[1][order],
                               rtol=1e-6, atol=1e-9)


def test_before_losses_are_cached_and_reused(tiny_dirs, tmp_path):
    att = _attributor(tiny_dirs, tmp_path / "cache")
    first = att.before_losses()
    again = _attributor(tiny_dirs, tmp_path / "cache")
    assert "score before" not in again.timings.stages
    np.testing.assert_array_equal(again.before_losses(), first)
    assert "score before" not in again.timings.stages
    other_plan = _attributor(tiny_dirs, tmp_path / "cache", plan=ScoringPlan(timesteps=(10, 20), flips=False))
    assert other_plan.before_losses().shape == (9, 1)


def test_dattri_adapter_matches_the_attributor(tiny_dirs, tmp_path):
    from forgetscore.attribution.dattri import DattriAttributor

    att = _attributor(tiny_dirs, tmp_path / "cache")
    train = att.train
    pixels = torch.stack([train.load_pixels(i, att.model.image_shape) for i in range(len(train))])
    loader = [{"image": pixels[i:i + 4], "text": train.captions[i:i + 4]} for i in range(0, len(train), 4)]
    queries = torch.rand(2, 1, 8, 8) * 2 - 1
    prompts = ["a red square", "a small dot"]
    adapter = DattriAttributor(att.model, plan=PLAN, config=CONFIG, fisher_samples=12)
    adapter.cache(loader)
    scores = adapter.attribute(loader, [(queries, prompts)])
    assert scores.shape == (len(train), 2)
    want = att.attribute_many(list(zip(queries, prompts)), config=CONFIG, fisher_samples=12)
    for j in range(2):
        np.testing.assert_allclose(scores[:, j].numpy(), want[j].scores, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match=r"^test_dataloader: images are \(3, 8, 8\), the model makes"):
        adapter.attribute(loader, [(torch.zeros(1, 3, 8, 8), ["a red square"])])


def test_model_identity_does_not_depend_on_where_it_was_loaded_from(tiny_dirs, tmp_path):
    import shutil

    from forgetscore.attribution import DiffusionModel

    model_dir, _ = tiny_dirs
    shutil.copytree(model_dir, tmp_path / "copy")
    a, b = DiffusionModel.load(model_dir), DiffusionModel.load(tmp_path / "copy")
    assert a.unet_id() == b.unet_id() and a.encoders_id() == b.encoders_id()
    first = b.unet_id()
    with torch.no_grad():
        next(b.unet.parameters()).add_(1e-3)  # seen by the version counter: no call needed
    changed = b.unet_id()
    assert changed not in (first, a.unet_id())
    b.unet.load_state_dict(a.unet.state_dict())
    assert b.unet_id() == first
    next(b.unet.parameters()).data.mul_(2)  # invisible to version counters
    assert b.unet_id() == first
    b.forget_ids()
    assert b.unet_id() not in (first, changed)
    enc = b.encoders_id()
    b.tokenizer.add_tokens(["<new9>"])  # the cheap parts are looked at on every call
    assert b.encoders_id() != enc


def test_swapped_weights_keep_the_model_id_without_hashing_again(tiny_dirs, tmp_path, monkeypatch):
    from forgetscore.attribution import model as model_mod

    att = _attributor(tiny_dirs, tmp_path / "cache")
    model = att.model
    before, encoders = model.unet_id(), model.encoders_id()
    hashed = []
    real = model_mod._hash_module
    monkeypatch.setattr(model_mod, "_hash_module", lambda h, m: (hashed.append(m), real(h, m)))
    name = att.names[0]
    other = {name: torch.rand_like(dict(model.unet.named_parameters())[name])}
    att.sweep().run([None, other], progress=False)  # swaps `other` in and back out
    assert model.unet_id() == before and model.encoders_id() == encoders and hashed == []
    with model.swapped(other):
        inside = model.unet_id()  # the swapped-in weights are another model
        assert inside != before and len(hashed) == 1
    assert model.unet_id() == before and len(hashed) == 1
    with pytest.raises(RuntimeError, match="boom"), model.swapped(other):
        raise RuntimeError("boom")
    assert torch.equal(dict(model.unet.named_parameters())[name], dict(_attributor(tiny_dirs, tmp_path / "c2").model
                                                                       .unet.named_parameters())[name])
    assert model.unet_id() == before and len(hashed) == 1


@pytest.mark.parametrize("prediction_type,latent", [("v_prediction", False), ("epsilon", True)])
def test_other_model_kinds_equal_brute_force(prediction_type, latent, tmp_path):
    """v-prediction models, and latent models whose inputs come from a VAE (scaled by its factor)."""
    model_dir = tiny.build_model(tmp_path / "model", prediction_type=prediction_type, latent=latent)
    train_dir = tiny.build_train(tmp_path / "train", n=4)
    plan = ScoringPlan(timesteps=(7, 600), captions="first", flips=True, seed=4)
    att = Attributor.load(model_dir, train_dir, plan=plan, cache_dir=tmp_path / "cache", progress=False)
    got = att.before_losses()
    model = att.model
    assert model.prediction_type == prediction_type and (model.vae is not None) == latent
    want = np.zeros_like(got)
    with torch.no_grad():
        for i in range(4):
            pixels = att.train.load_pixels(i, model.image_shape)
            ctx = model.encode_text([att.train.captions[i][0]])[0]
            for v in range(2):
                img = pixels.flip(-1) if v else pixels
                x0 = (model.vae.encode(img[None]).latent_dist.mean[0] * model.vae.config.scaling_factor
                      if latent else img)
                want[i, v] = np.mean([_mse(model, model.unet, x0, ctx, t, plan.seed, i,
                                           ScoringPlan.draw_id(v, 0, t)).item() for t in plan.timesteps])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # A query given as an image file goes through the same encoder.
    from PIL import Image
    Image.fromarray((np.random.default_rng(0).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "q.png")
    result = att.attribute(tmp_path / "q.png", "a red dot", k=2, fisher_samples=6,
                           config=UnlearnConfig(draws=4, micro_batch=4, damping=0.1))
    assert np.isfinite(result.scores).all() and result.query.shape == (1, 8, 8)


def test_candidate_subset_reuses_the_cached_before_losses(tiny_dirs, tmp_path):
    att = _attributor(tiny_dirs, tmp_path / "cache")
    query = torch.rand(1, 8, 8) * 2 - 1
    full = att.attribute(query, "a green line", config=CONFIG, fisher_samples=12)
    subset = np.array([7, 2, 4])
    part = att.attribute(query, "a green line", config=CONFIG, fisher_samples=12, indices=subset)
    np.testing.assert_allclose(part.scores[subset], full.scores[subset], rtol=1e-6, atol=1e-10)
    assert np.isneginf(np.delete(part.scores, subset)).all()
    assert set(part.top(3)) == set(subset)
    # Listed twice, or out of order: each image is scored once, with the same numbers.
    swept = []
    real = att._run
    att._run = lambda variants, sel, desc, **kw: (swept.append(list(sel)), real(variants, sel, desc, **kw))[1]
    again = att.attribute(query, "a green line", config=CONFIG, fisher_samples=12, indices=[4, 7, 2, 7, 4])
    assert swept == [[2, 4, 7]]
    np.testing.assert_array_equal(again.scores, part.scores)
    # Without a cache, a subset is scored on its own and caches nothing partial.
    fresh = _attributor(tiny_dirs, tmp_path / "cache2")
    alone = fresh.attribute(query, "a green line", config=CONFIG, fisher_samples=12, indices=subset)
    np.testing.assert_allclose(alone.scores[subset], full.scores[subset], rtol=1e-6, atol=1e-10)
    assert not fresh._before_path().is_file()


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_dattri_loader_reads_default_collated_caption_lists(batch_size):
    """PyTorch's default collate turns per-image caption lists into caption k of every image."""
    from torch.utils.data import DataLoader

    from forgetscore.attribution.dattri import _rows

    items = [{"image": torch.full((1, 8, 8), i / 5 - 0.5), "text": [f"cap {i} a", f"cap {i} b"]} for i in range(5)]
    with warnings.catch_warnings():  # two images with two captions each: read so, with a warning (tested below)
        warnings.simplefilter("ignore")
        got = [caps for _, text in _rows(DataLoader(items, batch_size=batch_size)) for caps in text]
    assert got == [item["text"] for item in items]
    # Per-image lists as a custom collate gives them are read as they are.
    custom = [{"image": torch.stack([it["image"] for it in items[:2]]), "text": [it["text"] for it in items[:2]]}]
    assert [caps for _, text in _rows(custom) for caps in text] == [items[0]["text"], items[1]["text"]]


def test_dattri_loaders_refuse_pixels_and_texts_the_attributor_refuses(tiny_dirs):
    from torch.utils.data import DataLoader

    from forgetscore.attribution.dattri import DattriAttributor, _rows

    def rows(image, text, name="loader"):
        return list(_rows([(image, text)], name))

    good = torch.rand(2, 1, 8, 8) * 2 - 1
    bad = [((good * 127.5 + 127.5).to(torch.uint8), r"images of dtype torch.uint8; give float pixels"),
           (good * 127.5 + 127.5, r"pixels must lie in \[-1, 1\]; a batch spans .*from 0..255"),
           (good.clone().fill_(float("nan")), "images hold NaN or inf")]
    for image, match in bad:
        with pytest.raises(ValueError, match="^train_dataloader: " + match):
            rows(image, ["a", "b"], "train_dataloader")
    for text in ([None, "a"], ["a", 3], [["a", None], "b"]):
        with pytest.raises(ValueError, match=r"^loader: a text is \w+; give each image a caption"):
            rows(good, text)
    with pytest.warns(UserWarning, match=r"no pixel is below 0.*\[0, 1\]"):
        rows((good + 1) / 2, ["a", "b"])
    with pytest.warns(UserWarning, match="read as PyTorch's default collate"):
        assert rows(good, [("a", "b"), ("c", "d")])[0][1] == [["a", "c"], ["b", "d"]]
    items = [(good[i], "a red dot") for i in range(2)]
    with pytest.warns(UserWarning, match="the loader shuffles"):
        list(_rows(DataLoader(items, batch_size=2, shuffle=True)))
    adapter = DattriAttributor(DiffusionModel.load(tiny_dirs[0]), plan=PLAN, config=replace(CONFIG, method="sgd"))
    train = [(good, ["a red dot", "a blue line"])]
    for prompts, match in ((["  "], "prompt: '  ' is empty"), ([["a", "b"]], "a test row has 2 texts")):
        with pytest.raises(ValueError, match=match):
            adapter.attribute(train, [(good[:1], prompts)])
