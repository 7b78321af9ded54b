"""How stable is the unlearning top-K?  Which source of randomness moves it?

On the original model and queries of a finished `forgetscore evaluate loo` run, the unlearning
scores are recomputed with one thing changed at a time: the seed of the query-gradient draws,
the seed of the scoring plan's fixed noise, a 4x denser timestep grid, 10x more gradient draws.
Printed: the overlap of each variant's top-K with the default's, per query and averaged.

    python benchmarks/topk_stability.py RUN_DIR [--queries 3] [--cache DIR]
"""
from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import int_range  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="output directory of `forgetscore evaluate loo` (coupled)")
    p.add_argument("--queries", type=int_range(1), default=3)
    p.add_argument("--cache", type=Path, default=None, help="engine cache (default: RUN/cache)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from forgetscore.attribution.attributor import Attributor
    from forgetscore.attribution.plan import ScoringPlan
    from forgetscore.evaluation.loo import DEFAULT_PLAN_STRIDE
    from forgetscore.evaluation.methods import DEFAULT_UNLEARN
    from forgetscore.evaluation.retrain import RetrainJob

    original = args.run / "retrains" / RetrainJob((), True).key
    saved = torch.load(args.run / "queries.pt", weights_only=False)
    pairs = [(img, spec["prompt"]) for spec, img in list(zip(saved["specs"], saved["images"]))[:args.queries]]

    def scores(stride: int, plan_seed: int, unlearn_seed: int, draws: int) -> np.ndarray:
        plan = ScoringPlan.with_stride(stride, flips=False, seed=plan_seed)
        a = Attributor.load(original, args.run / "train", plan=plan, cache_dir=args.cache or args.run / "cache",
                            progress=False)
        t = time.perf_counter()
        res = a.attribute_many(pairs, config=replace(DEFAULT_UNLEARN, seed=unlearn_seed, draws=draws), k=1)
        print(f"  stride {stride}, plan seed {plan_seed}, gradient seed {unlearn_seed}, {draws} draws: "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        return np.stack([r.scores for r in res])

    d = DEFAULT_UNLEARN.draws
    base = scores(DEFAULT_PLAN_STRIDE, 0, 0, d)
    variants = {"gradient seed 1": scores(DEFAULT_PLAN_STRIDE, 0, 1, d),
                "plan seed 1": scores(DEFAULT_PLAN_STRIDE, 1, 0, d),
                f"stride {DEFAULT_PLAN_STRIDE // 4}": scores(DEFAULT_PLAN_STRIDE // 4, 0, 0, d),
                f"{10 * d} draws": scores(DEFAULT_PLAN_STRIDE, 0, 0, 10 * d)}
    for name, s in variants.items():
        for k in (9, 18, 54):
            ov = [len(set(np.argsort(-base[i], kind="stable")[:k]) & set(np.argsort(-s[i], kind="stable")[:k])) / k
                  for i in range(len(pairs))]
            print(f"{name:<16} top-{k:<3d} overlap with the default: {np.mean(ov):.2f} "
                  f"({' '.join(f'{o:.2f}' for o in ov)})")


if __name__ == "__main__":
    main()
