"""The customized-model benchmark: concepts, customize(), the pool folder and run_custom's bookkeeping.

Everything runs on tiny random models (seconds); the real benchmark is measured by running it.
"""
import importlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch

from forgetscore.attribution import DiffusionModel, TrainingSet
from forgetscore.attribution.params import select
from forgetscore.digits.concepts import CONCEPTS, TOKEN, get_concept
from forgetscore.digits.data import VOCABULARY
from forgetscore.evaluation import custom
from forgetscore.evaluation import customize as cust
from forgetscore.evaluation.metrics import average_precision, recall_at_k


# One thread: see conftest.one_thread.
pytestmark = pytest.mark.usefixtures("one_thread")


def build_digits_vocab_model(root: Path, seed: int = 0) -> Path:
    """tests/tiny.py's model with the digits' tokenizer, so style captions ("a <new1> handwritten three") work."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgetscore.digits.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    tok = build_tokenizer(max_length=8)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
        attention_head_dim=4, norm_num_groups=4)
    for name, part in (("tokenizer", tok), ("text_encoder", text), ("unet", unet),
                       ("scheduler", DDPMScheduler(num_train_timesteps=1000))):
        part.save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("custom")
    model = build_digits_vocab_model(root / "model")
    train = tiny.build_train(root / "train", n=9, seed=3)
    return model, train


def _state(model: DiffusionModel) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    out.update({f"text.{k}": v.clone() for k, v in model.text_encoder.state_dict().items()})
    return out


# --- concepts ---------------------------------------------------------------------------------
def test_concepts_are_deterministic_digit_like_and_use_the_vocabulary():
    kinds = [c.kind for c in CONCEPTS.values()]
    assert kinds.count("object") >= 3 and kinds.count("style") >= 3
    for c in CONCEPTS.values():
        ex = c.exemplars(5, seed=0)
        assert ex.shape == (5, 1, 8, 8) and ex.dtype == torch.float32
        torch.testing.assert_close(ex, c.exemplars(5, seed=0), rtol=0, atol=0)
        assert not torch.equal(ex, c.exemplars(5, seed=1))
        ink = (ex + 1) * 8  # the digits' value mapping: x / 8 - 1 with integer ink 0..16
        assert torch.equal(ink, ink.round()) and float(ink.min()) >= 0 and float(ink.max()) <= 16
        mass = ink.sum(dim=(1, 2, 3))
        assert bool(((mass > 312 - 3 * 34) & (mass < 312 + 3 * 34)).all()), (c.name, mass)
        for text in c.captions(5) + c.query_prompts(6):
            assert TOKEN in text.split()
            assert all(w in VOCABULARY for w in text.split() if w != TOKEN), text
        if c.kind == "style":
            assert len(set(c.digits(5))) == 5  # different digits in one style
            assert {p.split()[-1] for p in c.query_prompts(10)} == {
                "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"}
    with pytest.raises(ValueError, match="concept: 'nope'"):
        get_concept("nope")


# --- customize --------------------------------------------------------------------------------
def test_customize_moves_only_kv_and_the_new_row(dirs, tmp_path):
    model_dir, train_dir = dirs
    c = get_concept("segment")
    ex, caps = c.exemplars(3), c.captions(3)
    out = cust.customize(model_dir, ex, caps, tmp_path / "a", steps=4, lr=1e-2, embedding_lr=1e-1,
                           batch_size=3, reg_dir=train_dir, reg_per_step=2, seed=0, init_word="regular")
    base, new = DiffusionModel.load(model_dir), DiffusionModel.load(out)
    old_vocab = base.tokenizer.get_vocab()
    vocab = new.tokenizer.get_vocab()
    assert vocab[TOKEN] == len(old_vocab) and {k: vocab[k] for k in old_vocab} == old_vocab
    ids = new.tokenizer(caps[0]).input_ids
    assert vocab[TOKEN] in ids and new.tokenizer.unk_token_id not in ids
    kv = {f"unet.{n}" for n in select(base.unet, "kv")}
    a, b = _state(base), _state(new)
    emb = next(k for k in a if k.startswith("text.") and k.endswith("token_embedding.weight"))
    assert a.keys() == b.keys()
    for k in a:
        if k in kv:
            assert not torch.equal(a[k], b[k]), f"{k} did not move"
        elif k == emb:
            assert b[k].shape[0] == a[k].shape[0] + 1
            assert torch.equal(a[k], b[k][:-1])  # every old row bit-identical
            init = a[k][old_vocab["regular"]]
            assert not torch.equal(b[k][-1], init)  # the new row trained away from its init word
        else:
            assert torch.equal(a[k], b[k]), f"{k} changed"
    info = json.loads((out / cust.CUSTOMIZATION_FILE).read_text())
    assert info["token"] == TOKEN and info["steps"] == 4 and info["reg_per_step"] == 2
    # Deterministic from the seed; another seed gives other weights.
    again = DiffusionModel.load(cust.customize(model_dir, ex, caps, tmp_path / "b", steps=4, lr=1e-2,
                                                 embedding_lr=1e-1, batch_size=3, reg_dir=train_dir, reg_per_step=2,
                                                 seed=0, init_word="regular"))
    assert all(torch.equal(v, _state(again)[k]) for k, v in b.items())
    other = DiffusionModel.load(cust.customize(model_dir, ex, caps, tmp_path / "c", steps=4, lr=1e-2,
                                                 embedding_lr=1e-1, batch_size=3, reg_dir=train_dir, reg_per_step=2,
                                                 seed=1, init_word="regular"))
    assert not torch.equal(_state(other)[emb], b[emb])


def test_new_token_starts_from_its_init_word_or_the_mean(dirs):
    model_dir, _ = dirs
    for init in ("digit", None):
        m = DiffusionModel.load(model_dir)
        before = m.text_encoder.get_input_embeddings().weight.detach().clone()
        n_old, new_id = cust._add_token(m, TOKEN, init)
        w = m.text_encoder.get_input_embeddings().weight
        want = before[m.tokenizer.convert_tokens_to_ids("digit")] if init else before.mean(0)
        assert new_id == n_old == before.shape[0]
        torch.testing.assert_close(w[new_id], want, rtol=0, atol=0 if init else 1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"token": "thick"}, "token: 'thick' is already"),
    ({"token": "two words"}, "token: 'two words' must be one"),
    ({"captions": ["a handwritten one"] * 2}, "must contain the token"),
    ({"captions": ["a <new1> handwritten one"]}, "captions: 1 for 2 exemplars"),
    ({"captions": ["a <new1> purple one"] * 2}, "words the tokenizer does not know"),
    ({"exemplars": torch.zeros(2, 8, 8)}, "exemplars: need a tensor"),
    ({"exemplars": torch.full((2, 1, 8, 8), 2.0)}, r"in \[-1, 1\]"),
    ({"exemplars": torch.zeros(2, 1, 4, 4)}, "exemplars: images are"),
    ({"init_word": "purple"}, "init_word: 'purple'"),
    ({"reg_per_step": 2}, "reg_dir: None"),
    ({"steps": 0}, "steps: 0"),
    ({"lr": 0.0}, "lr: 0.0"),
])
def test_customize_bad_input(dirs, tmp_path, kwargs, match):
    model_dir, _ = dirs
    args = {"exemplars": torch.zeros(2, 1, 8, 8), "captions": ["a <new1> handwritten one"] * 2, "steps": 1}
    args.update(kwargs)
    if "token" in kwargs:
        args["captions"] = [f"a {kwargs['token']} one"] * 2
    with pytest.raises(ValueError, match=match):
        cust.customize(model_dir, args.pop("exemplars"), args.pop("captions"), tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


# --- the pool ---------------------------------------------------------------------------------
def test_pool_is_the_training_set_then_the_exemplars(dirs, tmp_path):
    _, train_dir = dirs
    c = get_concept("asterisk")
    ex, caps = c.exemplars(3), c.captions(3)
    pool = TrainingSet.load(custom.write_pool(tmp_path / "pool", train_dir, ex, caps, extra={"concept": c.name}))
    train = TrainingSet.load(train_dir)
    n = len(train)
    assert len(pool) == n + 3
    assert pool.file_names[:n] == train.file_names and pool.captions[:n] == train.captions
    assert pool.file_names[n:] == ["exemplar-000.png", "exemplar-001.png", "exemplar-002.png"]
    assert pool.captions[n:] == [[cap] for cap in caps]
    assert all(e == {"exemplar": True, "concept": "asterisk"} for e in pool.extra[n:])
    for name in train.file_names:  # copied byte for byte, modification time kept
        assert (tmp_path / "pool" / name).read_bytes() == (train_dir / name).read_bytes()
        assert (tmp_path / "pool" / name).stat().st_mtime_ns == (train_dir / name).stat().st_mtime_ns
    back = torch.stack([pool.load_pixels(n + i, (1, 8, 8)) for i in range(3)])
    assert float((back - ex).abs().max()) <= 0.5 / 127.5 + 1e-6  # PNG quantization only
    with pytest.raises(ValueError, match="prefix: 'exemplar' gives names already"):  # a pool as training set
        custom.write_pool(tmp_path / "bad", tmp_path / "pool", ex[:1], caps[:1])
    assert not (tmp_path / "bad").exists()


def test_plain_pool_captions_drop_only_the_token():
    for c in CONCEPTS.values():
        caps = c.captions(10)
        assert custom.exemplar_pool_captions(caps, "fine-tuning", TOKEN) == caps
        plain = custom.exemplar_pool_captions(caps, "plain", TOKEN)
        assert len(plain) == len(caps)
        for before, after in zip(caps, plain):
            assert TOKEN not in after and after == after.strip() and "  " not in after
            assert after.split() == [w for w in before.split() if w != TOKEN]
    assert custom.exemplar_pool_captions(["a <new1>", "a <new1> handwritten three"], "plain", TOKEN) == [
        "a", "a handwritten three"]
    with pytest.raises(ValueError, match=r"pool_captions: 'none' is not one of \['fine-tuning', 'plain'\]"):
        custom.exemplar_pool_captions(["a <new1>"], "none", TOKEN)


def test_plain_pool_keeps_the_training_captions_and_drops_the_token_from_the_exemplars(dirs, tmp_path):
    _, train_dir = dirs
    c = get_concept("underlined")
    ex, caps = c.exemplars(3), c.captions(3)
    plain = custom.exemplar_pool_captions(caps, "plain", TOKEN)
    pool = TrainingSet.load(custom.write_pool(tmp_path / "pool", train_dir, ex, plain))
    train = TrainingSet.load(train_dir)
    n = len(train)
    assert pool.captions[:n] == train.captions
    assert pool.captions[n:] == [[cap.replace(f"{TOKEN} ", "")] for cap in caps]
    assert not any(TOKEN in cap for caps_ in pool.captions for cap in caps_)


# --- metrics bookkeeping ----------------------------------------------------------------------
def test_aggregate_pools_queries_per_kind_and_the_table_shows_them():
    pos = np.array([10, 11])  # a pool of 10 training images + 2 exemplars

    def q(**at):
        s = np.zeros(12)
        for i, v in at.items():
            s[int(i[1:])] = v
        return s

    obj1 = custom.ConceptRun("o1", "object", 10, pos, ["a", "a"], {"m": np.stack([q(i10=9, i11=8),
                                                                                q(i0=9, i10=8, i11=1)])})
    obj2 = custom.ConceptRun("o2", "object", 10, pos, ["a"], {"m": np.stack([q(i1=9, i10=1)])})
    sty = custom.ConceptRun("s1", "style", 10, pos, ["a"], {"m": np.stack([q(i11=1)])})
    agg = custom.aggregate([obj1, obj2, sty], ["m"])
    # Ranks of the positives: (1, 2), (2, 3), (2, 12: ties go to the lower index), style (12, 1).
    aps = np.array([1.0, (1 / 2 + 2 / 3) / 2, (1 / 2 + 2 / 12) / 2])
    recalls = np.array([1.0, 1.0, 0.5])
    o = agg["m"]["object"]
    assert o["n_queries"] == 3 and agg["m"]["style"]["n_queries"] == 1
    assert (o["n_concepts"], o["se_over"], agg["m"]["style"]["se_over"]) == (2, "concepts", "queries")

    def clustered(v, groups=(0, 0, 1)):  # CR1 over concepts, written out
        v = np.asarray(v)
        sums = [sum(v[i] - v.mean() for i in range(3) if groups[i] == c) for c in (0, 1)]
        return np.sqrt(2 * sum(x * x for x in sums)) / 3

    assert o["map"]["mean"] == pytest.approx(aps.mean())
    assert o["map"]["se"] == pytest.approx(clustered(aps))
    assert o["map"]["se_queries"] == pytest.approx(aps.std(ddof=1) / np.sqrt(3))
    assert o["recall@10"]["mean"] == pytest.approx(recalls.mean())
    assert o["recall@10"]["se"] == pytest.approx(clustered(recalls))
    assert agg["m"]["style"]["map"] == {"mean": pytest.approx((1 + 2 / 12) / 2), "se": None, "se_queries": None}
    results = {"aggregate": agg, "n_concepts": {"object": 2, "style": 1}, "n_train": 10,
               "settings": {"n_exemplars": 2}}
    table = custom.table_markdown(results)
    row = (f"| m | 0.833 ± {clustered(recalls):.3f} | {aps.mean():.3f} ± {clustered(aps):.3f} | 0.500 ± — | "
           "0.583 ± — |")  # one style query: no standard error
    assert row in table, table
    assert "over concepts, or over queries where a kind has one concept" in table


# --- run_custom -------------------------------------------------------------------------------
def _pixels_as_features(x: torch.Tensor) -> np.ndarray:
    return x.flatten(1).numpy().astype(np.float64)


TINY = custom.CustomSettings(concepts=("triangle", "segment"), n_exemplars=3, queries_per_concept=2, gen_steps=2,
                             custom_steps=2, custom_batch=2, reg_per_step=1, plan_stride=500, fisher_samples=8,
                             unlearn={"draws": 20, "micro_batch": 10}, batch_size=64)
METHODS = ("unlearning", "unlearning-10steps", "pixel", "feature", "caption")


def test_run_custom_bookkeeping_and_resume(dirs, tmp_path, monkeypatch, capsys):
    model_dir, train_dir = dirs
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    kw = {"methods": METHODS, "settings": TINY, "model_dir": model_dir, "train_dir": train_dir,
          "features": _pixels_as_features, "log": None}
    res = custom.run_custom(out, **kw)
    n = len(TrainingSet.load(train_dir))
    assert res["methods"] == list(METHODS) and res["n_train"] == n
    assert res["n_concepts"] == {"object": 1, "style": 1}
    for name, kind in (("triangle", "object"), ("segment", "style")):
        root = out / "concepts" / name
        assert res["concepts"][name]["kind"] == kind
        assert len(TrainingSet.load(root / "pool")) == n + 3
        assert (root / "model" / cust.CUSTOMIZATION_FILE).is_file()
        for m in METHODS:
            s = np.load(root / "scores" / f"{m}.npy")
            assert s.shape == (2, n + 3)
            want_ap = average_precision(s, np.arange(n, n + 3))
            np.testing.assert_allclose(res["concepts"][name]["per_method"][m]["ap"], want_ap)
            np.testing.assert_allclose(res["concepts"][name]["per_method"][m]["recall@10"],
                                       recall_at_k(s, np.arange(n, n + 3), 10))
        assert set(res["concepts"][name]["fidelity"]) == {"with_token", "without_token", "control_prompts"}
    obj = np.concatenate([res["concepts"]["triangle"]["per_method"]["pixel"]["ap"]])
    assert res["aggregate"]["pixel"]["object"]["map"]["mean"] == pytest.approx(obj.mean())
    saved = json.loads((out / "results.json").read_text())
    assert saved["aggregate"] == res["aggregate"] and saved["version"] == __import__("forgetscore").__version__
    assert (out / "table.md").read_text().count("\n| ") == len(METHODS) + 1
    assert (out / "scatter.png").read_bytes()[:4] == b"\x89PNG"
    # The 10-step ablation was derived from the overridden base (ten steps, a tenth of the draws).
    key = json.loads((out / "concepts" / "segment" / "scores" / "unlearning-10steps.json").read_text())
    assert "steps=10," in key["settings"] and "draws=2," in key["settings"] and "micro_batch=2," in key["settings"]
    key = json.loads((out / "concepts" / "segment" / "scores" / "unlearning.json").read_text())
    assert "steps=1," in key["settings"] and "draws=20," in key["settings"]

    # Resume: nothing finished is redone; a deleted product alone is rebuilt.
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "results" not in p.name
             and p.suffix != ".png" and p.name != "table.md"}
    (out / "concepts" / "segment" / "scores" / "pixel.npy").unlink()
    again = custom.run_custom(out, **kw)
    assert again["aggregate"] == res["aggregate"]
    changed = {p for p, t in stamp.items() if not p.exists() or p.stat().st_mtime_ns != t}
    scores = out / "concepts" / "segment" / "scores"
    assert changed == {scores / "pixel.npy", scores / "pixel.json"}
    _style_ranks_read_only_scores_of_the_current_pool(out, capsys)


def _style_ranks_read_only_scores_of_the_current_pool(out, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    style = importlib.import_module("custom_style")
    capsys.readouterr()
    style.main([str(out), "--methods", "pixel,caption"])
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.lstrip().startswith(("pixel ", "caption ")) and " / " in line for line in lines) == 2, lines
    # A later run with other pool captions rewrites the pool; until it scores them, these are another pool's.
    meta = out / "concepts" / "segment" / "pool" / "metadata.jsonl"
    meta.write_text(meta.read_text().replace('"text": ["', '"text": ["a '))
    style.main([str(out), "--methods", "pixel"])
    assert "pixel            no scores of this pool" in capsys.readouterr().out


def test_customization_is_keyed_on_the_base_models_content(dirs, tmp_path, monkeypatch):
    model_dir, train_dir = dirs
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = custom.customize
    monkeypatch.setattr(custom, "customize", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = replace(TINY, concepts=("triangle",))
    kw = {"methods": ("pixel",), "settings": settings, "train_dir": train_dir, "features": _pixels_as_features,
          "log": None}
    out = tmp_path / "run"
    custom.run_custom(out, model_dir=model_dir, **kw)
    assert len(calls) == 1
    moved = tmp_path / "elsewhere"
    shutil.copytree(model_dir, moved)
    (moved / "digit_accuracy.json").write_text("{}")  # a record kept beside the model is not the model
    assert custom.model_digest(moved) == custom.model_digest(model_dir)
    custom.run_custom(out, model_dir=moved, **kw)  # the same model at another path: reused
    assert len(calls) == 1
    weights = next(moved.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # other weights at the same path: customized again
    weights.write_bytes(bytes(data))
    assert custom.model_digest(moved) != custom.model_digest(model_dir)
    custom.run_custom(out, model_dir=moved, **kw)
    assert len(calls) == 2


def test_plain_pool_captions_keep_the_model_and_queries_and_change_only_the_exemplars_scores(dirs, tmp_path,
                                                                                             monkeypatch):
    model_dir, train_dir = dirs
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    kw = {"methods": ("pixel", "caption"), "settings": replace(TINY, concepts=("segment",)), "model_dir": model_dir,
          "train_dir": train_dir, "features": _pixels_as_features, "log": None}
    first = custom.run_custom(out, **kw)
    assert first["settings"]["pool_captions"] == "fine-tuning"
    assert "pool_captions: fine-tuning" in (out / "table.md").read_text()
    caption_before = np.load(out / "concepts" / "segment" / "scores" / "caption.npy")
    # In a folder of its own (one folder holds one run's settings: tests/test_eval_resume.py).
    out = tmp_path / "plain"
    root = out / "concepts" / "segment"
    plain = custom.run_custom(out, pool_captions="plain", **kw)
    for name in ("model.key.json", "queries.pt", "fidelity.json"):  # the same model and queries
        assert (root / name).read_bytes() == (tmp_path / "run" / "concepts" / "segment" / name).read_bytes()
    assert plain["settings"]["pool_captions"] == "plain"
    assert json.loads((out / "results.json").read_text())["settings"]["pool_captions"] == "plain"
    assert "pool_captions: plain" in (out / "table.md").read_text()
    pool, train = TrainingSet.load(root / "pool"), TrainingSet.load(train_dir)
    n = len(train)
    assert pool.captions[:n] == train.captions
    assert pool.captions[n:] == [[custom.without_token(c, TOKEN)] for c in get_concept("segment").captions(3)]
    for m in ("pixel", "caption"):  # scored on the plain pool
        assert json.loads((root / "scores" / f"{m}.json").read_text())["pool"] == pool.identity()
    caption_after = np.load(root / "scores" / "caption.npy")
    np.testing.assert_allclose(caption_after[:, :n], caption_before[:, :n], rtol=1e-6, atol=1e-9)
    assert not np.allclose(caption_after[:, n:], caption_before[:, n:])  # the exemplars lost the token


@pytest.mark.parametrize("kwargs, match", [
    ({"pool_captions": "none"}, r"pool_captions: 'none' is not one of \['fine-tuning', 'plain'\]"),
    ({"settings": replace(TINY, pool_captions="token-free")}, "pool_captions: 'token-free'"),
    ({"methods": ["random-class"]}, "need class labels"),
    ({"methods": ["nope"]}, r"methods: \['nope'\]"),
    ({"concepts": ["nope"]}, "concept: 'nope'"),
    ({"concepts": []}, "concepts: empty"),
    ({"queries_per_concept": 0}, "queries_per_concept: 0"),
    ({"model_dir": "x"}, "model_dir/train_dir: give both"),
])
def test_run_custom_bad_input_fails_before_any_work(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        custom.run_custom(tmp_path / "run", **{"methods": ["pixel"], "log": None, **kwargs})
    assert not (tmp_path / "run").exists()


def test_default_methods_leave_out_only_those_needing_labels():
    from forgetscore.evaluation.methods import METHODS as ALL

    assert set(ALL) - set(custom.default_methods()) == set(custom.NEEDS_LABELS) == {"random-class"}
