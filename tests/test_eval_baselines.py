"""The baseline attribution methods against plain reimplementations written here.

The tiny model and training folder are drawn afresh each run (the seed is printed).
"""
import copy
import dataclasses

import numpy as np
import pytest
import tiny
import torch
from conftest import fresh_seed
from PIL import Image

from forgetscore import kernels
from forgetscore.attribution import Attributor, ScoringPlan, UnlearnConfig, per_sample
from forgetscore.attribution import unlearning as unlearn_mod
from forgetscore.evaluation import baselines as bl
from forgetscore.evaluation import gradients as gr
from forgetscore.evaluation.base import EvalContext, Query

N = 7
PLAN = ScoringPlan(timesteps=(100, 500, 900), captions="all", flips=True, seed=7)
CONFIG = UnlearnConfig(draws=6, micro_batch=4, damping=0.1, seed=5)
FISHER_SAMPLES = 12


# One thread: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    seed = fresh_seed("data")
    root = tmp_path_factory.mktemp("tiny")
    return tiny.build_model(root / "model", seed=seed % 10_000), tiny.build_train(root / "train", n=N, seed=seed)


@pytest.fixture(scope="module")
def att(dirs, tmp_path_factory):
    # cross-attn: K/V, Q and output projections (image tokens too) and a bias, so every path runs.
    return Attributor.load(*dirs, plan=PLAN, weights="cross-attn", cache_dir=tmp_path_factory.mktemp("cache"),
                           progress=False)


@pytest.fixture
def gen():
    return np.random.default_rng(fresh_seed("test"))


def _queries(gen, n=2, labels=None):
    return [Query(torch.from_numpy(gen.uniform(-1, 1, (1, 8, 8))).float(), " ".join(gen.choice(tiny.WORDS, 3)),
                  label=None if labels is None else int(labels[j]), name=f"q{j}") for j in range(n)]


def _cos(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# --- cheap baselines ------------------------------------------------------------------------
def test_random_scores_are_reproducible_and_per_query(att, gen):
    ctx = EvalContext(att)
    qs = _queries(gen, 3)
    s = bl.RandomScores(seed=3).scores(ctx, qs)
    assert s.shape == (3, N) and s.dtype == np.float64
    np.testing.assert_array_equal(s, bl.RandomScores(seed=3).scores(ctx, qs))
    assert not np.array_equal(s[0], s[1]) and not np.array_equal(s[1], s[2])
    assert not np.array_equal(s, bl.RandomScores(seed=4).scores(ctx, qs))
    np.testing.assert_array_equal(bl.RandomScores(seed=3).scores(ctx, qs[:1]), s[:1])


def test_random_same_class_ranks_the_class_first(att, gen):
    labels = gen.integers(0, 3, N)
    labels[:3] = [0, 1, 2]  # every class present
    ctx = EvalContext(att, labels=labels)
    qs = _queries(gen, 3, labels=[0, 1, 2])
    s = bl.RandomSameClass(seed=1).scores(ctx, qs)
    assert s.shape == (3, N)
    for j, q in enumerate(qs):
        same = labels == q.label
        assert s[j, same].min() > s[j, ~same].max()
    np.testing.assert_array_equal(s, bl.RandomSameClass(seed=1).scores(ctx, qs))
    with pytest.raises(ValueError, match="ctx.labels"):
        bl.RandomSameClass().scores(EvalContext(att), qs)
    with pytest.raises(ValueError, match="label None"):
        bl.RandomSameClass().scores(ctx, _queries(gen, 1))
    with pytest.raises(ValueError, match="ctx.labels: shape"):
        bl.RandomSameClass().scores(EvalContext(att, labels=labels[:-1]), qs)


def test_pixel_similarity_is_the_cosine_of_pixels(att, dirs, gen):
    qs = _queries(gen, 2)
    got = bl.PixelSimilarity().scores(EvalContext(att), qs)
    for j, q in enumerate(qs):
        for i in range(N):
            img = np.asarray(Image.open(dirs[1] / f"{i:03d}.png"), dtype=np.float64) / 127.5 - 1
            assert got[j, i] == pytest.approx(_cos(q.image.numpy(), img), rel=1e-6, abs=1e-6)


def test_caption_similarity_is_the_mean_cosine_of_pooled_text(att, gen):
    model = att.model
    qs = _queries(gen, 2)

    def embed(text):
        ids = model.tokenizer(text, padding="max_length", max_length=model.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            hidden = model.text_encoder(ids)[0][0].double()
        return hidden[ids[0] != model.tokenizer.pad_token_id].mean(0).numpy()

    got = bl.CaptionSimilarity(batch_size=3).scores(EvalContext(att), qs)
    for j, q in enumerate(qs):
        for i, caps in enumerate(att.train.captions):
            want = np.mean([_cos(embed(q.prompt), embed(c)) for c in caps])
            assert got[j, i] == pytest.approx(want, rel=1e-5, abs=1e-7)


def test_feature_similarity_is_the_cosine_of_features(att, dirs, gen):
    proj = gen.standard_normal((64, 5))

    def features(px):
        return px.reshape(len(px), -1).double().numpy() @ proj

    qs = _queries(gen, 2)
    got = bl.FeatureSimilarity(batch_size=3).scores(EvalContext(att, features=features), qs)
    for j, q in enumerate(qs):
        for i in range(N):
            img = np.asarray(Image.open(dirs[1] / f"{i:03d}.png"), dtype=np.float64) / 127.5 - 1
            assert got[j, i] == pytest.approx(_cos(q.image.numpy().ravel() @ proj, img.ravel() @ proj), rel=1e-6,
                                              abs=1e-6)
    with pytest.raises(ValueError, match="ctx.features"):
        bl.FeatureSimilarity().scores(EvalContext(att), qs)


# --- gradient baselines: brute force ---------------------------------------------------------
def _grads(f, params):
    return [g.double() for g in torch.autograd.grad(f, params)]


def _selected(unet, names):
    ps = dict(unet.named_parameters())
    return [ps[n] for n in names]


def _row(model, unet, x0, ctx, t, seed, sid, did, output="loss"):
    """A row's scalar, written out: noise, one UNet call, the mean squared output or error (float64)."""
    dtype = next(unet.parameters()).dtype
    acp = model.alphas_cumprod
    eps = kernels.normal(seed, [sid], [did], x0.shape, backend="torch")[0].double()
    x_t = (acp[t].sqrt() * x0.double() + (1 - acp[t]).sqrt() * eps).to(dtype)
    pred = unet(x_t[None], torch.tensor([t]), encoder_hidden_states=ctx[None].to(dtype)).sample[0].double()
    return pred.square().mean() if output == "square" else (pred - eps).square().mean()


def _dtrak_brute(model, names, proj, x0, caps, ts, seed, sid, output):
    """Per-row gradients materialised (one backward each), projected by kron(A, B), summed over timesteps."""
    params = _selected(model.unet, names)
    feats = []
    for ci, c in enumerate(caps):
        ctx = model.encode_text([c])[0]
        for t in ts:
            grads = _grads(_row(model, model.unet, x0, ctx, t, seed, sid, ScoringPlan.draw_id(0, ci, t), output),
                           params)
            parts = []
            for n, g in zip(names, grads):
                a, b = proj[n]
                parts.append(a @ g.flatten() if b is None else torch.kron(a, b) @ g.flatten())
            feats.append((ci, torch.cat(parts)))
    return torch.stack([torch.stack([f for ci, f in feats if ci == k]).sum(0) for k in range(len(caps))]).mean(0)


def _with_weights(att, weights):
    """The module's Attributor, or one over other weights on the same model, data and cache."""
    if weights == "cross-attn":
        return att
    return Attributor(att.model, att.train, plan=PLAN, weights=weights, cache_dir=att.cache_dir, progress=False)


@pytest.mark.parametrize("output,captions,batch_size,weights", [("square", "first", 4, "cross-attn"),
                                                                ("loss", "all", 5, "cross-attn"),
                                                                ("square", "first", 4, "all")])
def test_dtrak_equals_explicit_projected_gradients(att, gen, monkeypatch, output, captions, batch_size, weights):
    att = _with_weights(att, weights)
    model = att.model
    dt = gr.DTrak(dim_per_side=3, timesteps=3, output=output, damping=0.1, seed=int(gen.integers(1000)),
                  batch_size=batch_size, captions=captions)
    ctx = EvalContext(att)
    qs = _queries(gen, 2)
    ts = dt.timestep_list(1000)
    assert ts == (0, 333, 666)
    proj = dt.projections(model, att.names)
    for p in model.unet.parameters():
        p.requires_grad_(True)
    try:
        want_train = torch.stack([
            _dtrak_brute(model, att.names, proj, att.train.load_pixels(i, model.image_shape),
                         att.train.captions[i][:1] if captions == "first" else att.train.captions[i], ts,
                         dt.seed ^ gr.DTRAK_STREAM, i, output) for i in range(N)])
        want_query = torch.stack([_dtrak_brute(model, att.names, proj, q.image, [q.prompt], ts,
                                               dt.seed ^ gr.DTRAK_QUERY_STREAM, 0, output) for q in qs])
    finally:
        for p in model.unet.parameters():
            p.requires_grad_(False)
    got_train, got_query = dt.train_features(ctx), dt.query_features(ctx, qs)
    assert got_train.shape == (N, sum(a.shape[0] * (a.shape[0] if b is not None else 1) for a, b in proj.values()))
    if weights == "cross-attn":  # 4 projections of 3 x 3 per layer, one bias of 3
        assert got_train.shape == (N, 7 * (4 * 9 + 3))
    else:  # every kind of layer: convolutions' B span C_in * kh * kw, norms' weights take A alone
        assert any(b is not None and b.shape[1] % 9 == 0 and model.unet.get_parameter(n).dim() == 4
                   for n, (a, b) in proj.items())
        assert any(b is None and n.endswith(".weight") for n, (a, b) in proj.items())
    for got, want in ((got_train, want_train), (got_query, want_query)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
    if weights == "all":
        _check_sliced_patches(monkeypatch, lambda: dataclasses.replace(dt).train_features(ctx), got_train)

    phi, phi_q = want_train.numpy(), want_query.numpy()
    gram = phi.T @ phi
    lam = 0.1 * np.mean(np.diag(gram))
    want = phi_q @ np.linalg.solve(gram + lam * np.eye(len(gram)), phi.T)
    got = dt.scores(ctx, qs)
    assert got.shape == (2, N) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
    # Undamped: the pseudo-inverse. With fewer images than features (rows of Phi independent),
    # pinv(Phi^T Phi) Phi^T = pinv(Phi) = Phi^T (Phi Phi^T)^-1: a small well-posed solve in float64.
    phi, phi_q = got_train.double().numpy(), got_query.double().numpy()
    assert phi.shape[0] < phi.shape[1]
    np.testing.assert_allclose(gr.trak_scores(got_train, got_query, 0.0),
                               phi_q @ phi.T @ np.linalg.inv(phi @ phi.T), rtol=1e-6,
                               atol=1e-8 * np.abs(phi_q @ phi.T).max())


def _check_sliced_patches(monkeypatch, compute, whole) -> None:
    """`compute()` with every convolution's patches made one row at a time equals `whole` (the same sums)."""
    sizes = []
    real = per_sample.gradient_terms

    def spy(module, x, g, n_rows):
        if isinstance(module, torch.nn.Conv2d):
            sizes.append(n_rows)
        return real(module, x, g, n_rows)

    with monkeypatch.context() as m:
        m.setattr(per_sample, "PATCH_BYTES", 1)
        m.setattr(per_sample, "gradient_terms", spy)
        sliced = compute()
    assert sizes and set(sizes) == {1}
    torch.testing.assert_close(torch.as_tensor(sliced), torch.as_tensor(whole), rtol=1e-6,
                               atol=1e-6 * float(torch.as_tensor(whole).abs().max()))


def _plan_loss(model, unet, train, i, plan):
    """Image i's loss under the plan: the mean over versions, captions and timesteps of its rows."""
    img = train.load_pixels(i, model.image_shape)
    rows = [_row(model, unet, img.flip(-1) if v else img, model.encode_text([c])[0], t, plan.seed, i,
                 ScoringPlan.draw_id(v, ci, t))
            for v in range(plan.versions) for ci, c in enumerate(train.captions[i]) for t in plan.timesteps]
    return torch.stack(rows).mean()


def _query_grad(model, names, q, config):
    params = _selected(model.unet, names)
    ctx = model.encode_text([q.prompt])[0]
    total = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
    for micro, lo in enumerate(range(0, config.draws, config.micro_batch)):
        count = min(config.micro_batch, config.draws - lo)
        for j, t in enumerate(unlearn_mod._timesteps(config.seed, 0, micro, count, 1000).tolist()):
            loss = _row(model, model.unet, q.image, ctx, t, config.seed ^ unlearn_mod.QUERY_STREAM, 0, lo + j)
            total = [a + g for a, g in zip(total, _grads(loss, params))]
    return [g / config.draws for g in total]


@pytest.mark.parametrize("weights", ["cross-attn", "all"])
def test_first_order_influence_equals_brute_force(att, gen, monkeypatch, weights):
    att = _with_weights(att, weights)
    model, names = att.model, att.names
    qs = _queries(gen, 2)
    ctx = EvalContext(att)
    method = gr.FirstOrderInfluence(config=CONFIG, fisher_samples=FISHER_SAMPLES, batch_size=5)
    got = method.scores(ctx, qs)
    assert got.shape == (2, N) and got.dtype == np.float64
    monkeypatch.setattr(gr, "_BUDGET", 1)  # one query at a time in the contraction: the same sums
    # regrouped, so float32 rounding of the size of the largest terms, not of a small score's own.
    np.testing.assert_allclose(method.scores(ctx, qs), got, rtol=1e-6, atol=1e-6 * np.abs(got).max())
    monkeypatch.undo()
    if weights == "all":
        _check_sliced_patches(monkeypatch, lambda: method.scores(ctx, qs), got)

    fisher = att.fisher(FISHER_SAMPLES)
    for p in model.unet.parameters():
        p.requires_grad_(True)
    try:
        g_q = [_query_grad(model, names, q, CONFIG) for q in qs]
        g_z = [_grads(_plan_loss(model, model.unet, att.train, i, PLAN), _selected(model.unet, names))
               for i in range(N)]
    finally:
        for p in model.unet.parameters():
            p.requires_grad_(False)
    inv = [1 / (fisher[n] + CONFIG.damping * fisher[n].mean()) for n in names]
    directions = [[f * g for f, g in zip(inv, gq)] for gq in g_q]
    want = np.array([[sum(float((gz * v).sum()) for gz, v in zip(g_z[i], directions[j])) for i in range(N)]
                     for j in range(len(qs))])
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

    # Without the Fisher (method "sgd") the direction is the query gradient itself.
    sgd = gr.FirstOrderInfluence(config=UnlearnConfig(draws=6, micro_batch=4, seed=5, method="sgd"), batch_size=64)
    want_sgd = np.array([[sum(float((gz * g).sum()) for gz, g in zip(g_z[i], g_q[j])) for i in range(N)]
                         for j in range(len(qs))])
    np.testing.assert_allclose(sgd.scores(ctx, qs), want_sgd, rtol=1e-3, atol=1e-4 * np.abs(want_sgd).max())

    # The score predicts the loss change along the direction: a central difference in float64.
    unet = copy.deepcopy(model.unet).double()
    ps = dict(unet.named_parameters())
    i, j = int(gen.integers(N)), int(gen.integers(len(qs)))
    eps = 1e-4 / max(float(v.abs().max()) for v in directions[j])

    def loss_at(step):
        with torch.no_grad():
            saved = {n: ps[n].clone() for n in names}
            for n, v in zip(names, directions[j]):
                ps[n] += step * v
            loss = float(_plan_loss(model, unet, att.train, i, PLAN))
            for n in names:
                ps[n].copy_(saved[n])
        return loss

    change = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert change == pytest.approx(got[j, i], rel=1e-2, abs=1e-3 * np.abs(got).max())


class _Doubled(torch.nn.Linear):
    def forward(self, x):  # the same weight, another function of it: no per-row rule
        return 2 * super().forward(x)


def test_gradient_baselines_reject_bad_input(att, gen):
    qs = _queries(gen, 1)
    unet = copy.deepcopy(att.model.unet)
    block = unet.down_blocks[-1].attentions[0].transformer_blocks[0]
    inner = block.attn2.to_k
    block.attn2.to_k = _Doubled(inner.in_features, inner.out_features, bias=False)
    names = [n for n, _ in unet.named_parameters() if "attn2" in n]
    with pytest.raises(ValueError, match=r"weights: \[.*attn2\.to_k\.weight.*not weights or biases of linear"):
        gr.rule_layers(unet, names)
    with pytest.raises(ValueError, match="not weights or biases of linear"):
        gr.rule_layers(unet, ["time_embedding.missing"])
    with pytest.raises(ValueError, match="output"):
        gr.DTrak(output="norm")
    with pytest.raises(ValueError, match="dim_per_side"):
        gr.DTrak(dim_per_side=0)
    with pytest.raises(ValueError, match="timesteps"):
        gr.DTrak(timesteps=2000).scores(EvalContext(att), qs)
    with pytest.raises(ValueError, match="damping"):
        gr.FirstOrderInfluence(damping=-1.0)
    with pytest.raises(ValueError, match="queries"):
        gr.DTrak().scores(EvalContext(att), [])
