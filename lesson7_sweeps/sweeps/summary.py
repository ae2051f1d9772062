"""A sweep's trials as one table: the parent's summary.csv/.html and plots, and `lesson7-compare`.

Everything is read back from the tracking store (the trials may have run in other processes or on
other machines), through tracking.py. So every name and value in it is data a store's writer chose:
printed as plain text without control characters (`printable`), rendered into HTML by an autoescaping
template, written into CSV with formula-like cells neutralised (`csv_safe`), and drawn without
math-text parsing.
"""

from __future__ import annotations

import ast
import logging
import math
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lesson7_sweeps.config import OBJECTIVES
from lesson7_sweeps.sweeps.names import printable, short_names
from lesson7_sweeps.tracking import MlflowLogger

log = logging.getLogger(__name__)
ENDED_WELL = ("FINISHED", "PRUNED")  # a pruned trial ended normally, stopped early on purpose
COLUMNS = ("trial", "run_id", "run_name", "objective", "status", "duration_s", "steps")
PARETO, ON_FRONT = "pareto", "✓"  # with several objectives: the column (after theirs) marking the Pareto front
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet reads as a formula (OWASP)
_PAGE = """<h3>{{ title }}</h3>
<table border="0" class="dataframe">
<thead><tr>{% for c in columns %}<th>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>
{% for row in rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
"""


def _cell(value: object) -> str:
    return "" if pd.isna(value) else f"{value:.6g}" if isinstance(value, float) else printable(value)


_LONG_DECIMAL = re.compile(r"[-+]?\d*\.\d{5,}(e[-+]?\d+)?|[-+]?\d(\.\d+)?e[-+]?\d+", re.IGNORECASE)


def _readable(value: object) -> str:
    """A cell for reading: a param read back as a long decimal (0.00012345678901234567) to 4 digits."""
    if isinstance(value, str) and _LONG_DECIMAL.fullmatch(value):
        return f"{float(value):.4g}"
    return _cell(value)


def _csv_cell(value: object) -> object:
    if not isinstance(value, str):
        return value
    text = printable(value)
    if text.startswith(_FORMULA_START) and pd.isna(pd.to_numeric(text, errors="coerce")):
        return "'" + text  # a spreadsheet shows it as text instead of running =HYPERLINK(...)
    return text


def csv_safe(table: pd.DataFrame) -> pd.DataFrame:
    """The table for a CSV file: text without control characters, and no cell a spreadsheet would run
    as a formula (a leading = + - @ tab or CR gets a ' first, numbers aside)."""
    return table.map(_csv_cell)


def html_page(title: str, table: pd.DataFrame) -> str:
    """The table as an HTML page, every title, header and cell escaped by the template engine."""
    import jinja2

    page = jinja2.Environment(autoescape=True).from_string(_PAGE)
    return page.render(title=printable(title), columns=[printable(c) for c in table.columns],
                       rows=[[_cell(v) for v in row] for row in table.itertuples(index=False)])


@dataclass
class Summary:
    parent_id: str
    title: str
    table: pd.DataFrame  # one row per trial, best first (see COLUMNS)
    swept: list[str]  # the swept keys' short names (columns of `table`)
    direction: str  # minimize | maximize; with several objectives one each, comma-joined
    objectives: tuple[str, ...] = ()  # several objectives: their names (columns of `table`, then PARETO)

    @property
    def primary(self) -> str:
        """The column of the (first) objective: what the plots colour and sort by."""
        return self.objectives[0] if self.objectives else "objective"

    @property
    def ways(self) -> list[str]:
        """The direction of each objective."""
        return self.direction.split(",")

    @property
    def front(self) -> pd.DataFrame:
        """With several objectives, the trials on the Pareto front, in the table's order."""
        return self.table[self.table[PARETO] == ON_FRONT]

    @property
    def n_trials(self) -> int:
        return len(self.table)

    def count(self, *statuses: str) -> int:
        return int(self.table["status"].isin(statuses).sum())

    @property
    def counts(self) -> dict[str, int]:
        """n_trials and how its trials ended, adding up to it: n_killed counts KILLED runs and any that
        never ended (a killed sweep marks its running trials KILLED before counting)."""
        n = {f"n_{s.lower()}": self.count(s) for s in ("FINISHED", "PRUNED", "FAILED")}
        return {"n_trials": self.n_trials, **n, "n_killed": self.n_trials - sum(n.values())}

    @property
    def n_ended_well(self) -> int:
        return self.count(*ENDED_WELL)

    @property
    def best(self) -> pd.Series | None:
        """The best FINISHED trial (a pruned trial's objective is from an earlier epoch)."""
        done = self.table[(self.table["status"] == "FINISHED") & self.table["objective"].notna()]
        return None if done.empty else done.iloc[0]

    def print(self, top: int = 5) -> None:
        render(self.table.head(top), f"{self.title}: top {min(top, self.n_trials)} of {self.n_trials} trials")
        n = self.counts
        print(f"{n['n_trials']} trials: {n['n_finished']} finished, {n['n_pruned']} pruned, {n['n_failed']} failed, "
              f"{n['n_killed']} killed")
        if self.objectives:
            front = self.front
            print(f"Pareto front: {len(front)} trial{'' if len(front) == 1 else 's'}: " + "; ".join(
                f"{printable(r['run_id'])} ({printable(r['run_name'])}), "
                + ", ".join(f"{printable(o)} {r[o]:.6g}" for o in self.objectives) for _, r in front.iterrows())
                  if len(front) else "Pareto front: none (no trial finished)")
            return
        best = self.best
        print(f"best run: {printable(best['run_id'])} ({printable(best['run_name'])}), objective "
              f"{best['objective']:.6g}" if best is not None else "best run: none (no trial finished)")


def pareto_front(values: np.ndarray, directions: Sequence[str]) -> np.ndarray:
    """Which rows of `values` (trials x objectives) are on the Pareto front, as Optuna's best_trials:
    no other row is as good in every objective and better in one. Equal rows are on it together;
    a row with a NaN or an infinity is not, and beats none."""
    loss = np.where(np.array(directions) == "maximize", -values, values).astype(float)
    finite = np.isfinite(loss).all(axis=1)
    cand = loss[finite]
    # [i, j]: trial j dominates trial i
    dominates = (cand[None, :, :] <= cand[:, None, :]).all(-1) & (cand[None, :, :] < cand[:, None, :]).any(-1)
    front = np.zeros(len(loss), dtype=bool)
    front[finite] = ~dominates.any(axis=1)
    return front


def trial_table(logger: MlflowLogger, parent: Any) -> Summary:
    """The trials of the sweep whose parent run is `parent` (an MLflow Run), best first."""
    tags = parent.data.tags
    swept = [k for k in tags.get("swept", "").split(",") if k]
    names = [n for n in tags.get("objective", "").split(",") if n]
    several = tuple(names) if len(names) > 1 else ()  # their metrics by name, else the one `objective`
    values = list(several) or ["objective"]
    fixed = [*COLUMNS[:3], *values, *([PARETO] if several else []), *COLUMNS[4:]]
    # a swept key named like a fixed column (objective, run_name...) keeps its full name, prefixed
    short = {k: f"swept.{k}" if v in fixed else v for k, v in short_names(swept).items()}
    ways = tags.get("direction", "minimize").split(",")
    rows = []
    for run in logger.search(f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                             experiment_id=parent.info.experiment_id):
        t, info = run.data.tags, run.info
        row: dict[str, Any] = {"trial": int(t["trial"]) if t.get("trial", "").isdigit() else None,
                               "run_id": info.run_id, "run_name": info.run_name}
        for key in swept:  # a group choice (model=gru,lstm) is a tag, a value a param
            row[short[key]] = run.data.params.get(key, t.get(f"choice.{key}"))
        for name in values:
            value = run.data.metrics.get(name)
            row[name] = value if value is not None and math.isfinite(value) else None
        row["status"] = "PRUNED" if t.get("trial_state") == "PRUNED" else info.status
        row["duration_s"] = round((info.end_time - info.start_time) / 1000, 1) if info.end_time else None
        row["steps"] = logger.last_step(info.run_id, "epoch")
        rows.append(row)
    columns = [*fixed[:3], *short.values(), *fixed[3:]]
    table = pd.DataFrame(rows, columns=columns)
    # best first: finished by objective, then pruned, then the rest; ties by trial number
    rank = table["status"].map({"FINISHED": 0, "PRUNED": 1}).fillna(2)
    if several:  # the Pareto front first (of the finished trials: a pruned one's values are from earlier)
        done = (table["status"] == "FINISHED").to_numpy()
        on_front = np.zeros(len(table), dtype=bool)
        on_front[done] = pareto_front(table.loc[done, values].to_numpy(dtype=float), ways)
        table[PARETO] = np.where(on_front, ON_FRONT, "")
        rank = rank - 0.5 * on_front
    key = table[values[0]] if ways[0] == "minimize" else -table[values[0]]
    table = table.assign(_r=rank, _k=key).sort_values(["_r", "_k", "trial"], na_position="last")
    table = table.drop(columns=["_r", "_k"]).reset_index(drop=True)
    table["trial"] = table["trial"].astype("Int64")
    table["steps"] = table["steps"].astype("Int64")
    title = f"{parent.info.run_name} ({parent.info.run_id}, objective {tags.get('objective')} {tags.get('direction')})"
    return Summary(parent.info.run_id, title, table, list(short.values()), tags.get("direction", "minimize"), several)


def write_summary(parent: Any) -> Summary:
    """Log the summary onto the sweep's parent run (a sweeps.parent.Parent): summary.csv,
    summary.html, best_* tags, counts, then the plots; and tag the best trial best=true. With several
    objectives, best_run_id is the Pareto front's run ids, comma-joined, each tagged best=true. A plot
    that fails loses only itself (a warning), never the table, the tags or the other plots."""
    logger = parent.logger
    (run,) = logger.search(f"attributes.run_id = '{parent.run_id}'")
    summary = trial_table(logger, run)
    best = None if summary.objectives else summary.best
    with tempfile.TemporaryDirectory(prefix="lesson7-summary-") as tmp:
        out = Path(tmp)
        csv_safe(summary.table).to_csv(out / "summary.csv", index=False)
        (out / "summary.html").write_text(html_page(summary.title, summary.table), encoding="utf-8")
        for path in [out / "summary.csv", out / "summary.html"]:
            logger.log_artifact(path)
        logger.log_metrics(summary.counts, step=0)
        if best is not None:
            logger.set_tags({"best_run_id": best["run_id"], "best_value": repr(float(best["objective"]))})
            logger.set_tags({"best": "true"}, run_id=best["run_id"])
        front = list(summary.front["run_id"]) if summary.objectives else []
        if front:
            logger.set_tags({"best_run_id": ",".join(front)})
        for run_id in front:
            logger.set_tags({"best": "true"}, run_id=run_id)
        for path in plots(summary, out):
            logger.log_artifact(path)
    return summary


def plots(summary: Summary, out: Path) -> list[Path]:
    """objective_vs_params.png (one panel per swept parameter) and parallel_coordinates.png (each
    finished trial a line across the swept parameters, coloured by the objective; the first of
    several); with several objectives pareto_front.png; the ones drawn. A plot that fails is left
    out with a warning: it never costs the others, or the summary."""
    done = summary.table[summary.table[summary.primary].notna()]
    if done.empty:
        return []
    drawn = []
    wanted = [_objective_vs_params, _parallel_coordinates] if summary.swept else []
    for plot in wanted + ([_pareto_plot] if summary.objectives else []):
        try:
            drawn.append(plot(summary, done, out))
        except Exception as e:  # matplotlib's own errors share no base class
            log.warning("sweep summary: %s was not drawn (%s: %s)", plot.__name__.lstrip("_"), type(e).__name__,
                        (str(e).splitlines() or [""])[0])
    return drawn


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["text.usetex"] = False  # labels are plain text, never LaTeX
    import matplotlib.pyplot as plt

    return plt


def _objective_vs_params(summary: Summary, done: pd.DataFrame, out: Path) -> Path:
    plt = _pyplot()
    # constrained layout makes room for the title and rotated ticks (tight_layout gives up on one panel)
    fig, axs = plt.subplots(1, len(summary.swept), figsize=(max(6, 4 * len(summary.swept)), 3.8), squeeze=False,
                            layout="constrained")
    try:
        for ax, name in zip(axs[0], summary.swept):
            x, ticks = _axis(done[name])
            ax.scatter(x, done[summary.primary], color="tab:blue")
            if ticks is not None:
                ax.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right")
            ax.set(xlabel=_plain(name), ylabel=_plain(summary.primary))
        fig.suptitle(f"{_plain(summary.primary)} ({_plain(summary.ways[0])}) vs each swept parameter")
        fig.savefig(out / "objective_vs_params.png", dpi=100)
    finally:
        plt.close(fig)
    return out / "objective_vs_params.png"


def _parallel_coordinates(summary: Summary, done: pd.DataFrame, out: Path) -> Path:
    # matplotlib has no parallel-coordinates plot with a continuous colour scale (pandas' colours by
    # class), so we draw one: every axis scaled to [0, 1], tick labels give the real values
    import matplotlib

    plt = _pyplot()
    names = [*summary.swept, summary.primary]
    columns = {n: _axis(done[n]) for n in names}
    scaled = {n: _scale(columns[n][0]) for n in names}
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(names) + 1), 4), layout="constrained")
    try:
        cmap = plt.get_cmap("viridis_r" if summary.ways[0] == "minimize" else "viridis")
        lo, hi = done[summary.primary].min(), done[summary.primary].max()
        if lo == hi:  # one finished trial (or all equal): the colour bar still needs a range
            lo, hi = lo - (abs(lo) * 0.05 or 1), hi + (abs(hi) * 0.05 or 1)
        norm = matplotlib.colors.Normalize(lo, hi)
        for i, value in enumerate(done[summary.primary]):
            ax.plot(range(len(names)), [scaled[n][i] for n in names], color=cmap(norm(value)), alpha=0.8)
        for j, n in enumerate(names):
            ax.axvline(j, color="grey", lw=0.8)
            x, ticks = columns[n]
            ends = [f"{min(x):.4g}", f"{max(x):.4g}"]
            labels = ticks if ticks is not None else ends[:1] if ends[0] == ends[1] else ends
            for label, y in zip(labels, _scale(range(len(labels)))):
                ax.text(j + 0.03, y, str(label), fontsize=8, va="center")
        ax.set_xticks(range(len(names)), [_plain(n) for n in names])
        # the scaled axes and their labels, also when every line is flat (one trial)
        ax.set(yticks=[], ylim=(-0.05, 1.05), xlim=(-0.1, len(names) - 0.7))
        fig.colorbar(matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=_plain(summary.primary))
        ax.set_title(f"trials across the swept parameters (colour: {_plain(summary.primary)})")
        fig.savefig(out / "parallel_coordinates.png", dpi=100)
    finally:
        plt.close(fig)
    return out / "parallel_coordinates.png"


def _pareto_plot(summary: Summary, done: pd.DataFrame, out: Path) -> Path:
    """The first two objectives: every finished trial a point, the Pareto front highlighted and
    joined (in the order of the first objective), its trials numbered."""
    plt = _pyplot()
    x, y = summary.objectives[:2]
    finished = summary.table[(summary.table["status"] == "FINISHED") & summary.table[[x, y]].notna().all(axis=1)]
    front = summary.front.sort_values(x)
    ways = summary.ways
    fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
    try:
        ax.scatter(finished[x], finished[y], color="tab:gray", alpha=0.6, label="finished trial")
        ax.plot(front[x], front[y], "o-", color="tab:red", label="Pareto front")
        for _, r in front.iterrows():
            ax.annotate(f"#{r['trial']}", (r[x], r[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xlabel=f"{_plain(x)} ({_plain(ways[0])})", ylabel=f"{_plain(y)} ({_plain(ways[1])})")
        more = f"; objectives 1-2 of {len(summary.objectives)}" if len(summary.objectives) > 2 else ""
        ax.set_title(f"Pareto front: {len(front)} of {len(finished)} finished trials{more}")
        ax.legend()
        fig.savefig(out / "pareto_front.png", dpi=100)
    finally:
        plt.close(fig)
    return out / "pareto_front.png"


def _plain(label: str) -> str:
    """A label matplotlib draws as written: an escaped $ never starts math text."""
    return printable(label).replace("$", r"\$")


def _axis(values: pd.Series) -> tuple[list[float], list[str] | None]:
    """Numbers stay numbers; anything else becomes positions 0..k-1 with its values as tick labels,
    lists of numbers (widths) ordered by their numbers, other values after them by their text."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return [float(v) for v in numbers], None
    ticks = sorted(values.astype(str).unique(), key=_order)
    return [float(ticks.index(str(v))) for v in values], [_plain(t) for t in ticks]


def _order(text: str) -> tuple:
    """Sort key of a value read back as text: "[8, 16]" before "[16, 32]" (as text it would follow)."""
    try:  # literals only (never code); the store bounds a param's length
        value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        value = None
    if isinstance(value, (list, tuple)) and all(type(v) in (int, float) for v in value):
        return 0, tuple(value), text
    return 1, (), text


def _scale(values: Any) -> list[float]:
    values = [float(v) for v in values]
    lo, hi = min(values), max(values)
    return [0.5 if hi == lo else (v - lo) / (hi - lo) for v in values]


def render(table: pd.DataFrame, title: str) -> None:
    """Print a trial table with rich (run ids in full: users copy them; long decimals rounded, the CSV
    keeps them). Every title, header and cell is a rich Text: a name with [markup] is printed as
    written, never parsed."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    out = Table(title=Text(printable(title)), title_justify="left")
    for column in table.columns:
        out.add_column(Text(printable(column)), no_wrap=column == "run_id",
                       justify="right" if column in ("trial", "objective", "duration_s", "steps", *OBJECTIVES)
                       else "left")
    exact = [c in ("run_id", "run_name", "sweep") for c in table.columns]  # ids are copied, in full
    for row in table.itertuples(index=False):
        out.add_row(*(Text(_cell(v) if keep else _readable(v)) for v, keep in zip(row, exact)))
    Console(width=None if sys.stdout.isatty() else 1000).print(out)  # a pipe or log file: no wrapping
