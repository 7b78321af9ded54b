"""Evaluating attribution methods: baselines, leave-K-out retraining, the customized-model benchmark.

    from forgetscore.evaluation import LooConfig, LooSetup, QuerySpec, run_loo
    run_loo("out/", LooSetup(train_fn, "train/", [QuerySpec("a prompt", seed=0)]),
            LooConfig(ks=(10, 50), methods=("unlearning", "pixel")))
"""
from .base import EvalContext, Method, Query, top_k
from .loo import LooConfig, LooSetup, QuerySpec, run_loo
from .methods import METHODS, build
from .retrain import MeasureSettings, RetrainJob, TrainFn

__all__ = ["EvalContext", "LooConfig", "LooSetup", "METHODS", "MeasureSettings", "Method", "Query", "QuerySpec",
           "RetrainJob", "TrainFn", "build", "run_loo", "top_k"]
