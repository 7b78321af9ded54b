"""Does a method's within-class ranking follow the query's stroke thickness, or a fixed bias?

On the demo's query (a thick seven) the thinnest sevens scored highest.  This checks whether
that is a bias of the method or a property of that query, on the queries of a finished
`forgetscore evaluate loo` run: per query and method, the Spearman correlation between score
and ink mass among the images of the query's digit, and whether the top-K's mean ink departs
from the class mean in the same direction as the query's own ink does.

    python benchmarks/ink_bias.py RUN_DIR [--k 18] [--methods unlearning,pixel,...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

# _common first: importing it puts the checkout ahead of any installed forgetscore.
from _common import choice_list, int_range, read_run

from forgetscore.digits.data import load_data, measure_attributes  # noqa: E402
from forgetscore.evaluation.methods import METHODS  # noqa: E402


def ink(images: torch.Tensor) -> np.ndarray:
    """Ink mass of images in [-1, 1] (the attribute behind the thin / regular / thick words)."""
    x = ((images.float().clamp(-1, 1) + 1) * 8)[:, 0].numpy().astype(np.float64)
    return measure_attributes(x)[:, 0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="output directory of `forgetscore evaluate loo`")
    p.add_argument("--k", type=int_range(1), default=18)
    p.add_argument("--methods", type=choice_list(METHODS), default=None,
                   help="comma-separated (default: the run's methods)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    results = read_run(p, args.run, "loo")
    run_methods = results["config"]["methods"]
    missing = [m for m in args.methods or () if m not in run_methods]
    if missing:  # before the queries and the training set are loaded
        p.error(f"--methods: the run has no scores of {', '.join(missing)}; choose from {', '.join(run_methods)}")
    gone = [str(f) for f in [args.run / "queries.pt", *(args.run / "scores" / f"{m}.npy" for m in
                                                       args.methods or run_methods)] if not f.is_file()]
    if gone:  # before the training set is loaded
        p.error(f"run: {', '.join(gone)} missing; give the output folder of a finished `forgetscore evaluate loo` "
                "run, as it left it")
    queries = torch.load(args.run / "queries.pt", weights_only=False)
    by_spec = {json.dumps(s, sort_keys=True): img for s, img in zip(queries["specs"], queries["images"])}
    specs = [{k: q[k] for k in ("prompt", "seed", "label")} for q in results["queries"]]
    q_ink = ink(torch.stack([by_spec[json.dumps(s, sort_keys=True)] for s in specs]))
    data = load_data(8)
    train_ink, labels = ink(data.images), data.labels.numpy()
    names = args.methods or run_methods
    print(f"{len(specs)} queries; per query: Spearman(score, ink | query's digit); sign agreement of "
          f"(top-{args.k} ink - class ink) with (query ink - class ink)")
    for name in names:
        scores = np.load(args.run / "scores" / f"{name}.npy")
        rho, agree = [], []
        for i, s in enumerate(specs):
            cls = labels == s["label"]
            rho.append(spearmanr(scores[i][cls], train_ink[cls]).statistic)
            top = np.argsort(-scores[i], kind="stable")[:args.k]
            agree.append(np.sign(train_ink[top].mean() - train_ink[cls].mean()) ==
                         np.sign(q_ink[i] - train_ink[cls].mean()))
        rho = np.asarray(rho)
        print(f"{name:<16} rho mean {np.nanmean(rho):+.2f} (min {np.nanmin(rho):+.2f}, max {np.nanmax(rho):+.2f}); "
              f"top-{args.k} ink on the query's side of its class mean: {int(np.sum(agree))}/{len(agree)}")


if __name__ == "__main__":
    main()
