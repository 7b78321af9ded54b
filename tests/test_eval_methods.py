"""Our method and its ablations as evaluation methods, against the engine and hand-made steps."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import tiny
import torch
from conftest import fresh_seed

from forgetscore.attribution import Attributor, ScoringPlan, UnlearnConfig
from forgetscore.attribution.unlearning import query_gradient
from forgetscore.evaluation import methods
from forgetscore.evaluation.base import EvalContext, Query

PLAN = ScoringPlan(timesteps=(100, 600), captions="all", flips=False, seed=3)
CONFIG = UnlearnConfig(draws=8, micro_batch=4, damping=0.1, seed=2)


# One thread: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    seed = fresh_seed("model", nbytes=2)
    root = tmp_path_factory.mktemp("m")
    att = Attributor.load(tiny.build_model(root / "model", seed=seed), tiny.build_train(root / "train", n=6, seed=seed),
                          plan=PLAN, cache_dir=root / "cache", progress=False)
    return EvalContext(att)


def _queries(n=2):
    g = torch.Generator().manual_seed(fresh_seed("query"))
    return [Query(torch.rand(1, 8, 8, generator=g) * 2 - 1, p) for p in ("a red square", "a big blue dot")[:n]]


def test_unlearning_method_is_the_engine(ctx):
    qs = _queries()
    m = methods.Unlearning(config=CONFIG)
    got = m.scores(ctx, qs)
    want = np.stack([r.scores for r in ctx.attributor.attribute_many([(q.image, q.prompt) for q in qs],
                                                                      config=CONFIG)])
    np.testing.assert_array_equal(got, want)
    assert got.shape == (2, 6) and np.isfinite(got).all()


def test_score_variants_equal_attribute(ctx):
    q = _queries(1)[0]
    a = ctx.attributor
    weights = a.unlearn(q.image, q.prompt, CONFIG)
    via_variants = a.score_variants([weights])[0]
    via_attribute = a.attribute(q.image, q.prompt, config=CONFIG).scores
    np.testing.assert_allclose(via_variants, via_attribute, rtol=0, atol=0)


def test_sgd_ablation_moves_along_the_gradient_by_the_newton_length(ctx):
    a = ctx.attributor
    q = _queries(1)[0]
    m = methods.Unlearning("unlearning-sgd", config=UnlearnConfig(**{**CONFIG.to_dict(), "method": "sgd"}),
                           match_newton_length=True)
    sgd = m._sgd_as_long_as_newton(a, q)
    newton = a.unlearn(q.image, q.prompt, CONFIG)
    ps = dict(a.model.unet.named_parameters())
    g = query_gradient(a.model, a.names, a.query_inputs(q.image), a.model.encode_text([q.prompt])[0], CONFIG)
    d_sgd = torch.cat([(sgd[n].double() - ps[n].double()).flatten() for n in a.names])
    d_newton = torch.cat([(newton[n].double() - ps[n].double()).flatten() for n in a.names])
    g_flat = torch.cat([g[n].flatten() for n in a.names])
    assert float(d_sgd.norm()) == pytest.approx(float(d_newton.norm()), rel=1e-4)
    cos = float(d_sgd @ g_flat / d_sgd.norm() / g_flat.norm())
    assert cos == pytest.approx(1.0, abs=1e-4)
    assert float(d_newton @ g_flat / d_newton.norm() / g_flat.norm()) < 0.999  # the Fisher changes the direction


def test_presets_and_registry(ctx):
    m = methods.build("unlearning-attn")
    a = m.attributor(ctx)
    assert a is not ctx.attributor and a.weights == "attn" and len(a.names) > len(ctx.attributor.names)
    assert methods.build("unlearning").attributor(ctx) is ctx.attributor
    ten = methods.build("unlearning-10steps").config
    one = methods.build("unlearning").config
    assert ten.steps == 10 and ten.alpha * 10 == pytest.approx(one.alpha) and ten.draws * 10 == one.draws
    for name in methods.METHODS:
        assert methods.build(name).name == name
    with pytest.raises(ValueError, match="method:"):
        methods.build("unlearn")
