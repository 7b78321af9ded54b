"""Style-like concepts in the customized-model benchmark: does a method find the style or the digit?

A style query ("a <new1> handwritten three") shows one digit in the new style; its exemplars
show five different digits in that style.  Without the token in the pool's captions
(`--pool-captions plain`), a method can only find all five by the style itself.  Per style
concept, query and method this prints where the exemplar of the query's own digit ranks,
the median rank of the other exemplars, and how much of the top-10 is training images of
the query's digit -- read from a finished `forgetscore evaluate custom` run.

    python benchmarks/custom_style.py RUN_DIR [--methods unlearning,pixel,...]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

# _common first: importing it puts the checkout ahead of any installed forgetscore.
from _common import choice_list, read_run

from forgetscore.attribution.data import TrainingSet  # noqa: E402
from forgetscore.digits.classifier import get_classifier  # noqa: E402
from forgetscore.digits.data import DIGIT_WORDS  # noqa: E402
from forgetscore.evaluation.methods import METHODS  # noqa: E402


def digit_of(text: str) -> int:
    """The digit a caption or prompt names (its last word), or -1."""
    last = text.split()[-1] if text.split() else ""
    return DIGIT_WORDS.index(last) if last in DIGIT_WORDS else -1


def ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of every pool image, best first, ties to the lower index (as the metrics)."""
    order = np.argsort(-scores, kind="stable")
    r = np.empty(len(order), dtype=np.int64)
    r[order] = np.arange(1, len(order) + 1)
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="output directory of `forgetscore evaluate custom`")
    p.add_argument("--methods", type=choice_list(METHODS),
                   default="unlearning,unlearning-attn,dtrak,influence,caption,pixel",
                   help="comma-separated methods to read (default: %(default)s)")
    return p


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    results = read_run(p, args.run, "custom")
    run_methods = results["methods"]
    missing = [m for m in args.methods if m not in run_methods]
    if missing:  # before any concept's pool, queries and classifier are loaded
        p.error(f"--methods: the run has no scores of {', '.join(missing)}; choose from {', '.join(run_methods)}")
    print(f"pool captions: {results['settings'].get('pool_captions', 'fine-tuning')}")
    print("per query: rank of the same-digit exemplar / median rank of the other exemplars / "
          "share of the top-10 that are the query's digit")
    for name, concept in results["concepts"].items():
        if concept["kind"] != "style":
            continue
        root = args.run / "concepts" / name
        meta = [json.loads(line) for line in (root / "pool" / "metadata.jsonl").read_text().splitlines()]
        digit = np.array([digit_of(m["text"][0]) for m in meta])
        exemplar = np.array([bool(m.get("exemplar")) for m in meta])
        q_digit = [digit_of(prompt) for prompt in concept["prompts"]]
        images = torch.load(root / "queries.pt", weights_only=False)["images"]
        seen = get_classifier(images.shape[-1]).predict(images)
        print(f"\n{name}: queries {', '.join(DIGIT_WORDS[d] for d in q_digit)}; the classifier sees "
              f"{', '.join(DIGIT_WORDS[int(d)] for d in seen)}")
        pool_id = TrainingSet.load(root / "pool").identity()
        for method in args.methods:
            # The pool is rewritten by a later run with other --pool-captions (and a stopped one may leave
            # results.json of the run before): scores of another pool would be read as ranks of this one.
            key = root / "scores" / f"{method}.json"
            if not key.is_file():
                print(f"  {method:<16} no scores of this pool; run evaluate custom again on this folder")
                continue
            if json.loads(key.read_text()).get("pool") != pool_id:
                # The pool's identity holds its files' modification times, so a copy (cp -r) or a touch
                # reads the same as a rewrite: the message names both.
                print(f"  {method:<16} no scores of this pool: it was rewritten since, or the run folder was "
                      "copied or touched (the pool's identity includes its files' modification times); "
                      "copy a run with cp -a, which keeps them, or run evaluate custom again on this folder "
                      "to score the pool as it is")
                continue
            scores = np.load(root / "scores" / f"{method}.npy")
            cells = []
            for q, d in enumerate(q_digit):
                r = ranks(scores[q])
                same = r[exemplar & (digit == d)]
                other = r[exemplar & (digit != d)]
                top = np.argsort(-scores[q], kind="stable")[:10]
                cells.append(f"{'/'.join(str(int(x)) for x in same) or '-'} / {int(np.median(other))} / "
                             f"{np.mean(digit[top] == d):.1f}")
            print(f"  {method:<16} " + " | ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
