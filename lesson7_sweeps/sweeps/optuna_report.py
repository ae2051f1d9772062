"""What an Optuna study adds to a sweep's summary: parameter importances (Optuna's default
evaluator) as a plot and a table, and the optimisation history as a plot (matplotlib PNGs)."""

from __future__ import annotations

import csv
from pathlib import Path

import optuna
from optuna.trial import TrialState


def write_report(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Write history.png and (once two trials finished) importances.{png,csv,md} into `out_dir`;
    the paths written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    paths = []
    if not done:
        return paths
    best = min if study.direction == optuna.study.StudyDirection.MINIMIZE else max
    values = [t.value for t in done]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([t.number for t in done], values, "o", label="trial")
    ax.plot([t.number for t in done], [best(values[: i + 1]) for i in range(len(values))], "-", label="best so far")
    pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.value is not None]
    if pruned:
        ax.plot([t.number for t in pruned], [t.value for t in pruned], "x", color="tab:gray", label="pruned (last)")
    ax.set(xlabel="trial", ylabel="objective", title=f"{study.study_name}: optimisation history")
    ax.legend()
    paths.append(_save(fig, out_dir / "history.png"))
    plt.close(fig)
    if len(done) < 2:  # importances compare finished trials
        return paths
    importances = optuna.importance.get_param_importances(study)
    names = list(importances)
    fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(names)))
    ax.barh(names[::-1], [importances[n] for n in names[::-1]])
    ax.set(xlabel="importance (Optuna default evaluator)", title="parameter importances")
    paths.append(_save(fig, out_dir / "importances.png"))
    plt.close(fig)
    with open(out_dir / "importances.csv", "w", newline="") as f:
        csv.writer(f).writerows([("param", "importance"), *importances.items()])
    rows = "".join(f"| {k} | {v:.3f} |\n" for k, v in importances.items())
    (out_dir / "importances.md").write_text(f"| param | importance |\n|---|---|\n{rows}")
    return [*paths, out_dir / "importances.csv", out_dir / "importances.md"]


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
