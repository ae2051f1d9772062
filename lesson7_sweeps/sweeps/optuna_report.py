"""What an Optuna study adds to a sweep's summary: parameter importances (Optuna's default
evaluator) as a plot and a table, and the optimisation history as a plot (matplotlib PNGs)."""

from __future__ import annotations

import csv
import warnings
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState


def write_report(study: optuna.Study, out_dir: Path, names: Sequence[str] = ()) -> list[Path]:
    """Write history.png and (once two trials finished) importances.{png,csv,md} into `out_dir`;
    the paths written. A multi-objective study (`names`: its objectives') gets one history panel and
    one importance column per objective."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    paths = []
    if not done:
        return paths
    several = len(study.directions) > 1
    labels = list(names) if several and len(names) == len(study.directions) else \
        [f"objective {i}" for i in range(len(study.directions))] if several else ["objective"]
    numbers = [t.number for t in done]
    fig, axs = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), squeeze=False)
    for i, (ax, way) in enumerate(zip(axs[0], study.directions)):
        values = [t.values[i] for t in done]
        ax.plot(numbers, values, "o", label="trial")
        if not several:  # "best so far" is one trial's only with one objective
            best = min if way == optuna.study.StudyDirection.MINIMIZE else max
            ax.plot(numbers, [best(values[: j + 1]) for j in range(len(values))], "-", label="best so far")
            pruned = [t for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,)) if t.value is not None]
            if pruned:
                ax.plot([t.number for t in pruned], [t.value for t in pruned], "x", color="tab:gray",
                        label="pruned (last)")
        title = f"{labels[i]} ({way.name.lower()})" if several else "optimisation history"
        ax.set(xlabel="trial", ylabel=labels[i], title=f"{study.study_name}: {title}")
        ax.legend()
    paths.append(_save(fig, out_dir / "history.png"))
    plt.close(fig)
    if len(done) < 2:  # importances compare finished trials
        return paths
    importances = [_importances(study, i) if several else optuna.importance.get_param_importances(study)
                   for i in range(len(labels))]
    params = list(importances[0])
    fig, axs = plt.subplots(1, len(labels), figsize=(6 * len(labels), 1 + 0.4 * len(params)), squeeze=False)
    for ax, label, found in zip(axs[0], labels, importances):
        ax.barh(params[::-1], [found[n] for n in params[::-1]])
        ax.set(xlabel="importance (Optuna default evaluator)",
               title=f"parameter importances: {label}" if several else "parameter importances")
    paths.append(_save(fig, out_dir / "importances.png"))
    plt.close(fig)
    header = ["param", *(labels if several else ["importance"])]
    rows = [[n, *(found[n] for found in importances)] for n in params]
    with open(out_dir / "importances.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    lines = "".join("| " + " | ".join([r[0], *(f"{v:.3f}" for v in r[1:])]) + " |\n" for r in rows)
    (out_dir / "importances.md").write_text(f"| {' | '.join(header)} |\n|{'---|' * len(header)}\n{lines}")
    return [*paths, out_dir / "importances.csv", out_dir / "importances.md"]


def _importances(study: optuna.Study, i: int) -> dict[str, float]:
    """The importances of the parameters for objective `i` of several, toward its better values
    (Optuna's evaluator seeks low targets: a maximised objective is negated)."""
    sign = -1 if study.directions[i] == optuna.study.StudyDirection.MAXIMIZE else 1
    with warnings.catch_warnings():  # its note that it seeks low targets: the sign above sees to that
        warnings.filterwarnings("ignore", "PedAnovaImportanceEvaluator computes", UserWarning)
        return optuna.importance.get_param_importances(study, target=lambda t: sign * t.values[i])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
