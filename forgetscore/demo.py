"""`forgetscore demo`: the whole method on the embedded digits model, with nothing to download.

Trains (once, then cached) a tiny text-to-image model on scikit-learn's 1797 digits with
captions describing each image, generates a query from a prompt, computes the Fisher,
unlearns the query and scores every training image, writing the model, the training
folder and the results into the output directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .attribution.io import check_writable, write_dir
from .digits.data import DIGIT_WORDS
from .digits.model import SAMPLE_GUIDANCE, SAMPLE_STEPS

DEFAULT_PROMPT = "a thick right slanted wide handwritten seven"
# The demo's settings, sized to run in about a minute on two CPU cores once the model is
# cached. The paper's MSCOCO plan (20 timesteps, all captions, flips) is `forgetscore attribute`'s
# default; digits are not flip-symmetric and the model is not trained with flips.
DEMO_STRIDE = 200
DEMO_FISHER_SAMPLES = 5 * 1797  # five epochs of the training set, as the paper
DEMO_DRAWS = 5000
# The digits model follows its prompt best at low guidance (see forgetscore.digits.model).
DEMO_GUIDANCE = SAMPLE_GUIDANCE
DEMO_SAMPLING_STEPS = SAMPLE_STEPS


def _copy_dir(src: Path, dst: Path) -> None:
    """Copy a folder (keeping modification times) so that `dst` appears whole or not at all."""
    write_dir(dst, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))


def run_demo(args: argparse.Namespace) -> int:
    from .attribution import Attributor, ScoringPlan, UnlearnConfig
    from .cache import cache_root
    from .attribution.attributor import generation_record
    from .attribution.results import RESULT_FILES, check_output_dir
    from .digits.classifier import digit_accuracy
    from .digits.data import load_data, write_image_folder
    from .digits.tokenizer import check_prompt
    from .digits.train import default_model_dir, ensure_model, train

    started = time.perf_counter()
    out = Path(args.out)
    # Checked before anything is trained or written.
    if args.topk < 1:
        raise ValueError(f"--topk: {args.topk} must be >= 1")
    if not 0 <= args.query_seed < 2 ** 64:  # it keys the query's noise and the unlearning draws
        raise ValueError(f"--query-seed: {args.query_seed} is outside [0, 2**64); give a non-negative seed")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError(f"--prompt: {args.prompt!r} has no words; give a prompt such as 'a thin handwritten two', "
                         "or leave --prompt out for the default")
    if args.prompt is not None:
        check_prompt(args.prompt, "--prompt")
    n_train = len(load_data().labels)
    if args.topk > n_train:
        raise ValueError(f"--topk: {args.topk} is more than the {n_train} training images; give at most {n_train}")
    # The cache is written after the model is trained: a bad place fails now, not then.
    check_writable(cache_root(), "FORGETSCORE_CACHE" if "FORGETSCORE_CACHE" in os.environ else "cache")
    check_output_dir(out, args.overwrite)
    taken = [f"{name}/" for name in ("model", "train") if (out / name).exists()]
    if taken and not args.overwrite:  # the demo writes its own copies there, replacing what is there
        raise ValueError(f"--out: {str(out)!r} already holds {' and '.join(taken)}, which the demo would replace; "
                         "choose a new directory, or pass --overwrite to replace them")
    out.mkdir(parents=True, exist_ok=True)
    stage = time.perf_counter()

    if args.retrain:
        train(out_dir=default_model_dir(), log=print)
    model_cache = ensure_model(log=print)
    trained = time.perf_counter() - stage
    # Copies keep the files' modification times, so the training folder's identity (and with it
    # the cached prepared data, Fisher and before-losses) is the same on every run.
    train_cache = cache_root() / "digits-train"
    if not (train_cache / "metadata.jsonl").is_file():
        write_image_folder(train_cache, overwrite=True)
    _copy_dir(model_cache, out / "model")
    _copy_dir(train_cache, out / "train")
    train_dir = out / "train"

    stage = time.perf_counter()
    accuracy, fresh = _accuracy(model_cache, digit_accuracy)
    measured = time.perf_counter() - stage
    print(f"digits model: {accuracy['accuracy']:.0%} of its generated digits are classified as the prompted "
          f"digit ({accuracy['n']} samples; per digit "
          + ", ".join(f"{v:.0%}" for v in accuracy["per_digit"].values()) + ")")

    prompt = DEFAULT_PROMPT if args.prompt is None else args.prompt
    plan = ScoringPlan.with_stride(DEMO_STRIDE, captions="all", flips=False, seed=0)
    att = Attributor.load(out / "model", train_dir, plan=plan, batch_size=1024)
    if trained > 1:
        att.timings.add("train model", trained, 0, "")
    att.timings.add("write files", time.perf_counter() - started - trained - measured, 0, "")
    if fresh:  # not when the record beside the cached model was read
        att.timings.add("digit accuracy", measured, accuracy["n"], "img")
    t = time.perf_counter()
    query = att.generate(prompt, args.query_seed, steps=DEMO_SAMPLING_STEPS, guidance_scale=DEMO_GUIDANCE)
    att.timings.add("generate query", time.perf_counter() - t, 1, "img")
    config = UnlearnConfig(steps=1, alpha=0.01, draws=DEMO_DRAWS, micro_batch=250, seed=args.query_seed)
    result = att.attribute(query, prompt, k=args.topk, config=config, fisher_samples=DEMO_FISHER_SAMPLES)
    result.metadata["digits_model_accuracy"] = accuracy["accuracy"]
    result.metadata["generated"] = generation_record(args.query_seed, DEMO_SAMPLING_STEPS, DEMO_GUIDANCE)
    result.save(out, train_dir=train_dir, k=args.topk, overwrite=args.overwrite)

    labels = np.array([json.loads(line)["label"] for line in (train_dir / "metadata.jsonl").read_text().splitlines()])
    digit = prompted_digit(prompt)
    print(f"\ntop {args.topk} training images for {prompt!r}:")
    for rec in result.top_records(args.topk):
        print(f"  {rec['rank']:>3}. {rec['file_name']}  digit {labels[rec['id']]}  score {rec['score']:+.3e}  "
              f"{rec['captions'][-1]}")
    if digit is not None:
        top = result.top(args.topk)
        label, word = digit
        print(f"{np.mean(labels[top] == label):.0%} of the top {len(top)} are {word}{'es' if word == 'six' else 's'} "
              f"(chance: {np.mean(labels == label):.0%})")
    print(f"\nwrote {out}/: model/, train/, {', '.join(RESULT_FILES)}")
    print("\ntime per stage:")
    for line in att.timings.lines(total=time.perf_counter() - started):
        print(line)
    return 0


def prompted_digit(prompt: str) -> tuple[int, str] | None:
    """The digit a prompt asks for and its word; None when it names none or several (no one class to count)."""
    named = {w for w in prompt.lower().split() if w in DIGIT_WORDS}
    if len(named) != 1:
        return None
    word = named.pop()
    return DIGIT_WORDS.index(word), word


def _accuracy(model_dir: Path, digit_accuracy) -> tuple[dict, bool]:
    """The model's digit accuracy under the demo's sampler, measured once per trained model and kept beside it;
    and whether it was measured now."""
    path = model_dir / "digit_accuracy.json"
    sampler = {"generate": "attribution", "steps": DEMO_SAMPLING_STEPS, "guidance_scale": DEMO_GUIDANCE}
    if path.is_file():
        rec = json.loads(path.read_text())
        if rec.get("sampler") == sampler:  # an older record, made with another sampler, is measured again
            return rec, False
    res = digit_accuracy(model_dir, n_per_digit=20, steps=DEMO_SAMPLING_STEPS, guidance_scale=DEMO_GUIDANCE,
                         progress=True)
    rec = {"accuracy": res["accuracy"], "per_digit": res["per_digit"], "n": 200, "sampler": sampler}
    from .attribution.io import write_json
    write_json(path, rec)
    return rec, True
