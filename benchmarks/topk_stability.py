"""How stable is the unlearning top-K?  Which source of randomness moves it?

On the original model and queries of a finished `forgetscore evaluate loo` run, the unlearning
scores are recomputed with one thing changed at a time: the seed of the query-gradient draws,
the seed of the scoring plan's fixed noise, a 4x denser timestep grid, 10x more gradient draws.
The default is the run's own scoring plan and unlearning settings (as it recorded them; the
library's defaults where it recorded none). Printed as each variant finishes: the overlap of its
top-K with the default's, per query and averaged; with --json, also written there after each
variant, so a run cut short keeps the variants it finished.

    python benchmarks/topk_stability.py RUN_DIR [--queries 3] [--cache DIR] [--json OUT]
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Importing _common puts the checkout first on sys.path, ahead of any installed forgetscore.
from _common import Results, int_range, json_path, read_run  # noqa: E402

KS = (9, 18, 54)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="output directory of `forgetscore evaluate loo`")
    p.add_argument("--queries", type=int_range(1), default=3)
    p.add_argument("--cache", type=Path, default=None, help="engine cache (default: RUN/cache)")
    p.add_argument("--json", type=json_path, metavar="OUT",
                   help="write the settings and each variant's overlaps as JSON (rewritten after every variant)")
    return p


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def unlearn_settings(recorded: str | None) -> dict:
    """The UnlearnConfig fields in the repr of the unlearning method a run's scores key records, {} without one."""
    try:
        tree = ast.parse(recorded or "", mode="eval").body
    except SyntaxError:
        return {}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "UnlearnConfig"]
    out = {}
    for kw in calls[0].keywords if calls else ():
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass
    return out


def run_settings(run: Path, results: dict | None):
    """(plan, unlearn config, coupled, where each came from) of the run: the plan and protocol from
    trainer.json (written before anything trains) or results.json, the unlearning settings from its
    scores key of the unlearning method; the library's defaults for what it did not record."""
    from forgetscore.attribution.plan import ScoringPlan
    from forgetscore.attribution.unlearning import UnlearnConfig
    from forgetscore.evaluation.loo import DEFAULT_PLAN_STRIDE
    from forgetscore.evaluation.methods import DEFAULT_UNLEARN

    made = _read(run / "trainer.json")
    config = (results or {}).get("config", {})
    key = _read(run / "scores" / "unlearning.json")
    plan_dict = made.get("plan") or config.get("plan") or key.get("plan")
    plan = ScoringPlan.from_dict(plan_dict) if plan_dict else ScoringPlan.with_stride(DEFAULT_PLAN_STRIDE,
                                                                                     flips=False)
    names = {f.name for f in fields(UnlearnConfig)}
    recorded = {k: v for k, v in unlearn_settings(key.get("settings")).items() if k in names}
    unlearn = replace(DEFAULT_UNLEARN, **recorded)
    coupled = made.get("coupled", config.get("coupled", True))
    source = {"plan": "the run's" if plan_dict else f"the default (stride {DEFAULT_PLAN_STRIDE}, no flips)",
              "unlearn": "the run's" if recorded else "the default (the run recorded no unlearning scores)"}
    return plan, unlearn, bool(coupled), source


def denser(plan, factor: int = 4):
    """The plan with `factor` times as many timesteps: a grid 0, S, 2S, ... becomes one of stride S // factor."""
    from forgetscore.attribution.plan import ScoringPlan

    ts = list(plan.timesteps)
    stride = ts[1] - ts[0] if len(ts) > 1 else 1000
    if ts == list(range(0, ts[-1] + 1, stride)):
        new = tuple(range(0, 1000, max(1, stride // factor)))
    else:  # not a grid from 0: factor - 1 more between each two, as evenly as integers allow
        new = tuple(sorted({a + (b - a) * j // factor for a, b in zip(ts, ts[1:]) for j in range(factor)} | {ts[-1]}))
    return ScoringPlan.from_dict({**plan.to_dict(), "timesteps": list(new)})


def score(model_dir: Path, train_dir: Path, cache: Path, pairs, plan, config) -> np.ndarray:
    """[Q, N] unlearning scores of the queries under `plan` and `config`."""
    from forgetscore.attribution.attributor import Attributor

    a = Attributor.load(model_dir, train_dir, plan=plan, cache_dir=cache, progress=False)
    res = a.attribute_many(pairs, config=config, k=1)
    return np.stack([r.scores for r in res])


def overlaps(base: np.ndarray, s: np.ndarray, k: int) -> list[float]:
    return [len(set(np.argsort(-base[i], kind="stable")[:k]) & set(np.argsort(-s[i], kind="stable")[:k])) / k
            for i in range(len(base))]


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from forgetscore.evaluation.retrain import RetrainJob

    results = read_run(p, args.run, "loo") if (args.run / "results.json").is_file() else None
    if results is None and not args.run.is_dir():
        p.error(f"run: {str(args.run)!r} is not a folder; give the output folder of a `forgetscore evaluate loo` run")
    plan, unlearn, coupled, source = run_settings(args.run, results)
    original = args.run / "retrains" / RetrainJob((), coupled).key
    needed = [original, args.run / "queries.pt", args.run / "train"]
    gone = [str(f) for f in needed if not f.exists()]
    if gone:  # before any model is loaded
        p.error(f"run: {', '.join(gone)} missing; give the output folder of a `forgetscore evaluate loo` run that "
                "has trained its original model and made its queries")
    saved = torch.load(args.run / "queries.pt", weights_only=False)
    pairs = [(img, spec["prompt"]) for spec, img in list(zip(saved["specs"], saved["images"]))[:args.queries]]
    cache = args.cache or args.run / "cache"

    d, seed = unlearn.draws, unlearn.seed
    variants = {"default": (plan, unlearn),
                f"gradient seed {seed + 1}": (plan, replace(unlearn, seed=seed + 1)),
                f"plan seed {plan.seed + 1}": (replace(plan, seed=plan.seed + 1), unlearn),
                f"4x timesteps ({len(denser(plan).timesteps)})": (denser(plan), unlearn),
                f"{10 * d} draws": (plan, replace(unlearn, draws=10 * d))}
    print(f"default: {len(plan.timesteps)} timesteps {list(plan.timesteps)}, plan seed {plan.seed} "
          f"({source['plan']}); gradient seed {seed}, {d} draws ({source['unlearn']})", flush=True)
    meta = {"run": str(args.run), "queries": len(pairs), "plan": plan.to_dict(), "unlearn": repr(unlearn),
            "source": source, "argv": sys.argv}
    record = Results(args.json, meta, variants={})
    base = None
    for name, (vplan, vconfig) in variants.items():
        t = time.perf_counter()
        s = score(original, args.run / "train", cache, pairs, vplan, vconfig)
        row = {"seconds": time.perf_counter() - t, "timesteps": list(vplan.timesteps), "plan_seed": vplan.seed,
               "gradient_seed": vconfig.seed, "draws": vconfig.draws}
        if base is None:
            base = s
            print(f"{name:<16} scored in {row['seconds']:.0f} s", flush=True)
        else:
            row["overlap"] = {}
            for k in KS:
                ov = overlaps(base, s, k)
                row["overlap"][f"top-{k}"] = ov
                print(f"{name:<16} top-{k:<3d} overlap with the default: {np.mean(ov):.2f} "
                      f"({' '.join(f'{o:.2f}' for o in ov)})", flush=True)
            print(f"{'':<16} scored in {row['seconds']:.0f} s", flush=True)
        record["variants"][name] = row
        record.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
