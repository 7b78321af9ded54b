"""How far mixed-precision scores agree with float32 scores, and how much faster they are.

Scores are differences of two losses, so the UNet's precision matters. On the embedded
digits model (trained on first use) with the demo's query and plan, this computes the
before/after losses of every training image in each precision from the same unlearned
weights, and reports the Spearman correlation of the scores with float32's, the overlap of
the top-10 and top-100, and the sweep time.

    python benchmarks/precision.py [--precisions fp32,bf16,fp16] [--json OUT]
    python benchmarks/precision.py --model M --train T --prompt "a <new1>"   # another model, e.g. fine-tuned
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--json")
    parser.add_argument("--model", help="model directory (default: the embedded digits model)")
    parser.add_argument("--train", help="training folder of --model")
    parser.add_argument("--prompt", help="query prompt (default: the demo's)")
    parser.add_argument("--query-seed", type=int, default=0)
    args = parser.parse_args()
    if bool(args.model) != bool(args.train):
        parser.error("--model and --train go together")

    from forgetscore import demo
    from forgetscore.attribution import Attributor, LossSweep, ScoringPlan, UnlearnConfig
    from forgetscore.cache import cache_root
    from forgetscore.digits.data import write_image_folder
    from forgetscore.digits.train import ensure_model

    if args.model:
        model_dir, train_dir = args.model, args.train
    else:
        model_dir = ensure_model(log=print)
        train_dir = cache_root() / "digits-train"
        if not (train_dir / "metadata.jsonl").is_file():
            write_image_folder(train_dir, overwrite=True)
    prompt = args.prompt or demo.DEFAULT_PROMPT
    plan = ScoringPlan.with_stride(demo.DEMO_STRIDE, captions="all", flips=False, seed=0)
    att = Attributor.load(model_dir, train_dir, plan=plan, batch_size=args.batch_size, progress=False)
    query = att.generate(prompt, args.query_seed, steps=demo.DEMO_SAMPLING_STEPS, guidance_scale=demo.DEMO_GUIDANCE)
    config = UnlearnConfig(steps=1, alpha=0.01, draws=demo.DEMO_DRAWS, micro_batch=250)
    data = att.prepare()
    weights = att.unlearn(query, prompt, config, fisher_samples=5 * data.n)
    rows_per_pass = 2 * int(np.diff(np.asarray(data.caption_offsets)).sum()) * len(plan.timesteps)

    rows, scores = [], {}
    for prec in args.precisions.split(","):
        sweep = LossSweep(att.model, data, plan, batch_size=args.batch_size, precision=prec)
        sweep.run([None, weights], np.arange(64), progress=False)  # warm-up
        t = time.perf_counter()
        losses = sweep.run([None, weights], progress=False)
        seconds = time.perf_counter() - t
        scores[prec] = (losses[1] - losses[0]).max(axis=1)
        rows.append({"precision": prec, "seconds": seconds,
                     "rows_per_s": rows_per_pass / seconds})
    ref = scores["fp32"] if "fp32" in scores else next(iter(scores.values()))
    for r in rows:
        s = scores[r["precision"]]
        r.update(spearman=spearman(s, ref), top10=overlap(s, ref, 10), top100=overlap(s, ref, 100),
                 speedup=rows[0]["seconds"] / r["seconds"])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {data.n} images, "
          f"{rows_per_pass} rows before + after; model {model_dir}, prompt {prompt!r}")
    print(f"{'precision':<10}{'sweep s':>9}{'rows/s':>9}{'x fp32':>8}{'spearman':>10}{'top-10':>8}{'top-100':>9}")
    for r in rows:
        print(f"{r['precision']:<10}{r['seconds']:>9.1f}{r['rows_per_s']:>9.0f}{r['speedup']:>8.2f}"
              f"{r['spearman']:>10.4f}{r['top10']:>8.2f}{r['top100']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
