"""Tables (Markdown, in the layout of the paper's Table 1) and plots of an evaluation."""
from __future__ import annotations

from pathlib import Path

from ..attribution.io import write_bytes

SCALE = 1e3  # ΔL and MSE are shown ×10⁻³, as in the paper


def _fmt(cell: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if cell is None:
        return "—"
    return f"{cell['mean'] * scale:.{digits}f} ± {_fmt_value(cell['se'], scale, digits)}"


def _fmt_value(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None else f"{value * scale:.{digits}f}"


def loo_table(results: dict) -> str:
    ks = [str(k) for k in results["config"]["ks"]]
    n = results["n_train"]
    head = " | ".join(f"K = {k} ({100 * int(k) / n:.1f} %)" for k in ks)
    sep = "|".join(["---"] * (len(ks) + 1))
    methods = results["methods"]
    protocol = "coupled" if results["config"]["coupled"] else "uncoupled"
    lines = [f"ΔL ×10⁻³ (query loss rise after removing the top-K and retraining; mean ± se over "
             f"{len(results['queries'])} queries; {protocol} retraining; higher is better)", "",
             f"| method | {head} |", f"|{sep}|"]
    for name, cells in methods.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells[k]["delta_loss"], SCALE) for k in ks) + " |")
    floor = methods.get("random", {})
    if floor:
        lines.append("| *noise floor (std of random removals)* | "
                     + " | ".join(_fmt_value(floor[k].get("noise_floor_std"), SCALE) for k in ks) + " |")
    lines += ["", "ΔL ×10⁻³ of the *other* queries (the same removals; a selective method moves its own query more)",
              "", f"| method | {head} |", f"|{sep}|"]
    for name, cells in methods.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(cells[k].get("delta_loss_other_queries"), SCALE)
                                                for k in ks) + " |")
    lines += ["", "Regeneration from the same noise and prompt: MSE ×10⁻³ ↑ / feature cosine similarity ↓", "",
              f"| method | {head} |", f"|{sep}|"]
    for name, cells in methods.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{_fmt(cells[k]['regen_mse'], SCALE)} / {_fmt(cells[k].get('regen_feature_similarity'), 1, 3)}"
            for k in ks) + " |")
    eff = results.get("unlearning_effectiveness")
    if eff:
        lines += ["", "Unlearning effectiveness (regeneration MSE ×10⁻³ after unlearning a query): "
                  f"the target {_fmt(eff['target_mse'], SCALE)}, other prompts {_fmt(eff['other_mse'], SCALE)}."]
    return "\n".join(lines) + "\n"


def loo_plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [int(k) for k in results["config"]["ks"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, cells in results["methods"].items():
        mean = [cells[str(k)]["delta_loss"]["mean"] * SCALE for k in ks]
        se = [(cells[str(k)]["delta_loss"]["se"] or 0.0) * SCALE for k in ks]  # one query: no bar
        style = {"linewidth": 2.5} if name == "unlearning" else {"linestyle": "--"} if name == "random" else {}
        ax.errorbar(ks, mean, yerr=se, marker="o", capsize=3, label=name, **style)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (images removed)")
    ax.set_ylabel("ΔL ×10⁻³ (query loss rise)")
    ax.set_title("Leave-K-out (" + ("coupled" if results["config"]["coupled"] else "uncoupled") + " retraining)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes(Path(path), buf.getvalue())


def write_loo_report(out: Path, results: dict) -> None:
    write_bytes(out / "table.md", loo_table(results).encode())
    loo_plot(results, out / "delta_loss.png")
