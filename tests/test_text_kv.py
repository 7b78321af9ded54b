"""Cross-attention keys and values once per caption: the same numbers as every row on its own states."""
import numpy as np
import pytest
import tiny
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention, AttnAddedKVProcessor, AttnProcessor, AttnProcessor2_0

from conftest import fresh_seed
from forgetscore.attribution import Attributor, ScoringPlan
from forgetscore.attribution.text_kv import SharedText, SharedTextProcessor

PROCESSORS = {"sdpa": AttnProcessor2_0, "classic": AttnProcessor}


def _layer(gen, **options) -> Attention:
    torch.manual_seed(int(gen.integers(2**31)))
    return Attention(query_dim=12, cross_attention_dim=10, heads=3, dim_head=4, **options).double().eval()


@pytest.mark.parametrize("kind", list(PROCESSORS))
@pytest.mark.parametrize("options", [{}, {"cross_attention_norm": "layer_norm", "residual_connection": True,
                                          "rescale_output_factor": 2.0, "upcast_attention": True}])
@pytest.mark.parametrize("four_d", [False, True])
def test_processor_against_the_layers_own(kind, options, four_d):
    gen = np.random.default_rng(fresh_seed("data"))
    attn = _layer(gen, **options)
    original = PROCESSORS[kind]()
    shared = SharedTextProcessor(original, kind)
    captions, rows = 3, 11
    index = torch.from_numpy(gen.integers(0, captions, rows))
    text = torch.from_numpy(gen.standard_normal((captions, 7, 10)))
    hidden = torch.from_numpy(gen.standard_normal((rows, 12, 2, 3) if four_d else (rows, 6, 12)))
    with torch.no_grad():
        want = original(attn, hidden, text[index])
        got = shared(attn, hidden, text, text_index=index)
        # without an index, and in self-attention, it is the layer's own processor
        plain = shared(attn, hidden, text[index])
        self_attn = Attention(query_dim=12, heads=3, dim_head=4).double().eval()
        own = shared(self_attn, hidden, None, text_index=index)
        want_own = original(self_attn, hidden, None)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(plain, want) and torch.equal(own, want_own)


def test_processor_with_a_mask_falls_back_to_the_layers_own():
    gen = np.random.default_rng(fresh_seed("data"))
    attn = _layer(gen)
    original = AttnProcessor2_0()
    index = torch.tensor([0, 1, 1, 0])
    text = torch.from_numpy(gen.standard_normal((2, 7, 10)))
    hidden = torch.from_numpy(gen.standard_normal((4, 6, 12)))
    mask = torch.from_numpy(gen.random((4, 7)) < 0.7).double().log()
    mask[:, 0] = 0.0
    with torch.no_grad():
        want = original(attn, hidden, text[index], mask)
        got = SharedTextProcessor(original, "sdpa")(attn, hidden, text, mask, text_index=index)
    assert torch.equal(got, want)


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    root = tiny.build_model(tmp_path_factory.mktemp("kv") / "model")
    return UNet2DConditionModel.from_pretrained(root / "unet").double().eval()


def _unet_inputs(gen, rows: int = 6, captions: int = 2):
    x = torch.from_numpy(gen.standard_normal((rows, 1, 8, 8)))
    t = torch.from_numpy(gen.integers(0, 1000, rows))
    text = torch.from_numpy(gen.standard_normal((captions, 8, 16)))
    index = torch.from_numpy(gen.integers(0, captions, rows))
    return x, t, text, index


@pytest.mark.parametrize("kind", list(PROCESSORS))
def test_unet_with_shared_text_against_every_row_its_states(unet, kind):
    gen = np.random.default_rng(fresh_seed("data"))
    unet.set_attn_processor(PROCESSORS[kind]())
    before = dict(unet.attn_processors)
    x, t, text, index = _unet_inputs(gen)
    shared = SharedText(unet)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=text[index]).sample
        with shared.installed() as on:
            assert on
            assert all(isinstance(p, SharedTextProcessor) for p in unet.attn_processors.values())
            got = unet(x, t, encoder_hidden_states=text, cross_attention_kwargs={"text_index": index}).sample
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert unet.attn_processors == before  # the layers' own processors are back


def test_installed_restores_after_an_error_and_reuses_its_processors(unet):
    unet.set_attn_processor(AttnProcessor2_0())
    before = dict(unet.attn_processors)
    shared = SharedText(unet)
    with pytest.raises(RuntimeError, match="boom"), shared.installed():
        first = dict(unet.attn_processors)
        raise RuntimeError("boom")
    assert unet.attn_processors == before
    with shared.installed():
        assert unet.attn_processors == first  # the same objects: a compiled UNet sees the same layers
        with shared.installed() as on:  # nested: still shared inside and after
            assert on and unet.attn_processors == first
        assert unet.attn_processors == first
    assert unet.attn_processors == before


def test_not_installed_where_a_layer_is_not_mirrored(unet):
    shared = SharedText(unet)
    name = next(iter(unet.attn_processors))
    mixed = {n: (AttnAddedKVProcessor() if n == name else AttnProcessor2_0()) for n in unet.attn_processors}
    unet.set_attn_processor(dict(mixed))  # it empties the dict it is given
    try:
        with shared.installed() as on:
            assert not on and unet.attn_processors == mixed
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    unet.register_to_config(addition_embed_type="text")
    try:
        with shared.installed() as on:
            assert not on
    finally:
        unet.register_to_config(addition_embed_type=None)
    with shared.installed() as on:
        assert on


def test_sweep_losses_with_and_without_shared_text(tmp_path, monkeypatch):
    model_dir, train_dir = tiny.build_model(tmp_path / "model"), tiny.build_train(tmp_path / "train", n=7)
    plan = ScoringPlan(timesteps=(5, 300, 700), flips=True, seed=fresh_seed("plan") % 1000)
    att = Attributor.load(model_dir, train_dir, cache_dir=tmp_path / "cache", plan=plan, batch_size=16,
                          progress=False)
    data = att.prepare()
    sweep = att.sweep()
    batch = sweep._load(np.arange(3))
    assert batch.ctx.shape[0] == sum(len(c) for c in att.train.captions[:3])  # each caption once, not per row
    name = att.names[0]
    p = att.model.unet.get_parameter(name)
    variants = [None, {name: p.detach() * 1.1}]
    assert sweep._shared_text._plan() is not None  # the tiny model's layers are all mirrored
    got = sweep.run(variants, progress=False)
    monkeypatch.setattr(SharedText, "_plan", lambda self: None)
    want = sweep.run(variants, progress=False)
    assert got.shape == (2, data.n, 2)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
