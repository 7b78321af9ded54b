"""`forgetscore evaluate loo|custom`: the counterfactual and customized-model benchmarks on the digits model."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

EPILOG = """examples:
  forgetscore evaluate loo --out loo-run                 # the full leave-K-out table (54 min on 2 cores)
  forgetscore evaluate loo --out loo-quick --quick       # a short version (minutes on a CPU)
  forgetscore evaluate loo --out loo-unc --uncoupled     # retrain the usual way (randomness not coupled)
  forgetscore evaluate custom --out custom-run           # the customized-model benchmark (Recall@10, mAP)"""

# Default leave-K-out: K ≈ 0.5 %, 1 % and 3 % of the 1797 digits. Every method costs 30 retrains
# (10 queries x 3 K), so the default keeps our method, its Fisher ablation, the label-only bars and
# the strongest baselines of each kind (pixels, image features, gradients) within an hour on two
# cores; caption, influence and the weight-preset ablations are one --methods away.
DEFAULT_KS = (9, 18, 54)
DEFAULT_QUERIES = 10
DEFAULT_METHODS = ("unlearning", "unlearning-sgd", "random", "random-class", "pixel", "feature", "dtrak")
QUICK = {"ks": (54,), "methods": ("unlearning", "random", "random-class", "pixel"), "queries": 4,
         "random_sets": 2}


def _csv(kind):
    def parse(text: str):
        try:
            items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None
        repeated = [x for i, x in enumerate(items) if x in items[:i]]
        if repeated:  # a second, identical column in the table
            raise argparse.ArgumentTypeError(f"{text!r} names {repeated[0]} twice; give each once")
        return items
    return parse


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="counterfactual (leave-K-out) and customized-model benchmarks",
                       description="Evaluate attribution methods on the embedded digits model.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    loo = which.add_parser("loo", help="remove each method's top-K images, retrain, measure the query's loss rise",
                           epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    loo.add_argument("--out", required=True,
                     help="output directory; a run already there is resumed if it had the same --recipe, "
                          "--uncoupled and --plan-stride (a run with others is refused: give it its own --out); "
                          "--methods, --ks, --queries and --random-sets may differ, and what they share is reused")
    loo.add_argument("--quick", action="store_true", help="a short version (minutes on a CPU): 4 queries, K = 54, "
                                                          "methods unlearning, random, random-class, pixel")
    loo.add_argument("--uncoupled", action="store_true",
                     help="retrain the usual way: one generator consumed in order, so removals shift every batch")
    loo.add_argument("--methods", type=_csv(str), help=f"comma-separated (default: {','.join(DEFAULT_METHODS)})")
    loo.add_argument("--ks", type=_csv(int), help="comma-separated K values (default: 9,18,54)")
    loo.add_argument("--queries", type=int, help="how many of the 30 built-in query prompts (default: 10); "
                                                        "a larger run reuses a smaller one's retrains in the same --out")
    loo.add_argument("--random-sets", type=int, help="random removals per K, shared by all queries (default: 3)")
    loo.add_argument("--plan-stride", type=int,
                     help="scoring plan: timesteps 0, S, 2S, ... (default 200, 5 timesteps, for time; the paper's "
                          "MSCOCO plan is 50: less noise in the scores, four times the scoring time)")
    loo.add_argument("--workers", type=int, default=2, help="retrains in parallel, one thread each (default: 2)")
    loo.add_argument("--recipe", default="default", help="digits training recipe (default: default)")
    loo.set_defaults(func=_loo)

    from .custom import POOL_CAPTIONS

    custom = which.add_parser("custom", help="fine-tune on new concepts, find their exemplars (Recall@10, mAP)",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    custom.add_argument("--out", required=True,
                        help="output directory; a run already there is resumed if it had the same --quick and "
                             "--pool-captions (a run with others is refused: give it its own --out); --methods "
                             "may differ, and the methods already scored are reused")
    custom.add_argument("--quick", action="store_true", help="a few-minute version")
    custom.add_argument("--methods", type=_csv(str), help="comma-separated (default: every method without labels)")
    custom.add_argument("--pool-captions", choices=POOL_CAPTIONS, default="fine-tuning",
                        help="the exemplars' captions in the pool: their fine-tuning captions (default), or plain: "
                             "the same without the new token, so no method finds the exemplars by the token in "
                             "their captions (the model is still fine-tuned and queried with it)")
    custom.set_defaults(func=_custom)


def _loo(args: argparse.Namespace) -> int:
    from ..attribution.io import check_writable
    from ..digits import evaluation as de
    from ..digits.data import write_image_folder
    from ..digits.train import RECIPES
    from ..attribution.plan import ScoringPlan
    from .base import say
    from .loo import DEFAULT_PLAN_STRIDE, LooConfig, LooSetup, QuerySpec, run_loo
    from .methods import METHODS

    quick = QUICK if args.quick else {}
    methods = quick.get("methods", DEFAULT_METHODS) if args.methods is None else args.methods
    if not methods:  # e.g. "--methods ,": nothing named is not "the defaults"
        raise ValueError(f"--methods: none given; choose from {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    n_queries = quick.get("queries", DEFAULT_QUERIES) if args.queries is None else args.queries
    if not 1 <= n_queries <= len(de.QUERY_PROMPTS):
        raise ValueError(f"--queries: {n_queries} must be in [1, {len(de.QUERY_PROMPTS)}]")
    if args.workers < 1:
        raise ValueError(f"--workers: {args.workers} must be >= 1")
    stride = DEFAULT_PLAN_STRIDE if args.plan_stride is None else args.plan_stride
    if not 1 <= stride <= 999:
        raise ValueError(f"--plan-stride: {stride} must be in [1, 999]")
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe: unknown {args.recipe!r}; choose from {', '.join(RECIPES)}")
    labels = de.labels()
    ks = quick.get("ks", DEFAULT_KS) if args.ks is None else args.ks
    if not ks or not all(1 <= k < len(labels) for k in ks):
        raise ValueError(f"--ks: {','.join(map(str, ks))!r}: give Ks in [1, {len(labels) - 1}] (a retrain needs "
                         "images left)")
    random_sets = quick.get("random_sets", 3) if args.random_sets is None else args.random_sets
    if random_sets < 1:
        raise ValueError(f"--random-sets: {random_sets} must be >= 1 (random removals are the noise floor)")
    check_writable(args.out, "--out")
    config = LooConfig(ks=ks, methods=tuple(methods), plan=ScoringPlan.with_stride(stride, flips=False),
                       random_sets=random_sets, coupled=not args.uncoupled,
                       workers=args.workers, effectiveness="unlearning" in methods)
    out = Path(args.out)
    train_dir = out / "train"
    if not (train_dir / "metadata.jsonl").is_file():
        write_image_folder(train_dir, overwrite=True)
    specs = [QuerySpec(p, seed=i, label=de.prompt_label(p)) for i, p in enumerate(de.QUERY_PROMPTS[:n_queries])]
    setup = LooSetup(de.DigitsTrainer(args.recipe), train_dir, specs, labels=labels, features=de.features)
    t = time.perf_counter()
    results = run_loo(out, setup, config, log=say)
    say("")
    say((out / "table.md").read_text())
    say(f"{results['retrains']} retrains, {results['retrain_seconds_mean']:.0f} s each on average; "
        f"{(time.perf_counter() - t) / 60:.1f} min in this run (a resumed run reuses what earlier runs made). "
        f"Results in {out}/results.json, table.md, delta_loss.png")
    return 0


def _custom(args: argparse.Namespace) -> int:
    from ..attribution.io import check_writable
    from .base import say
    from .custom import run_custom

    check_writable(args.out, "--out")
    run_custom(Path(args.out), methods=args.methods, quick=args.quick, pool_captions=args.pool_captions, log=say)
    say(f"Results in {args.out}/results.json and table.md (printed above)")
    return 0
