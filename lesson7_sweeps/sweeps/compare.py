"""`lesson7-compare`: a sweep's trials as a table, best first, swept parameters as columns.

    lesson7-compare                         # the latest sweep in the default store
    lesson7-compare PARENT_RUN_ID           # that sweep
    lesson7-compare --experiment lesson7    # every sweep of an experiment, newest first
    lesson7-compare --csv > trials.csv      # the same rows as CSV
    lesson7-compare --tracking-uri http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from lesson7_sweeps.errors import UserError
from lesson7_sweeps.stored import default_uri  # composes conf/ without importing torch (lesson7_sweeps.train)
from lesson7_sweeps.sweeps.names import printable
from lesson7_sweeps.sweeps.summary import csv_safe, render, trial_table
from lesson7_sweeps.tracking import MlflowLogger

PROG = "lesson7-compare"
SWEEPS = "tags.run_type = 'sweep'"


def parents(uri: str, run_id: str | None, experiment: str | None) -> tuple[MlflowLogger, list]:
    """The store's logger and the parent runs to show, newest first; UserError when there are none."""
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no MLflow store at {uri} (no such file); give --tracking-uri or set MLFLOW_TRACKING_URI")
    logger = MlflowLogger(uri, experiment or "", None, None, heartbeat_s=0, stale_after_s=0)  # it only reads
    newest = ["attributes.start_time DESC"]
    if run_id is not None:
        found = logger.search(f"attributes.run_id = '{run_id}'", all_experiments=True) if run_id.isalnum() else []
        if not found:
            raise UserError(f"no run {run_id!r} in {uri}; check the id and --tracking-uri")
        if found[0].data.tags.get("run_type") != "sweep":
            raise UserError(f"run {run_id} is not a sweep's parent run (its run_type is "
                            f"{printable(found[0].data.tags.get('run_type', 'unset'))}); give the parent's id, or none "
                            f"for the latest sweep")
        return logger, found
    if experiment is not None:
        found = logger.search(SWEEPS, order_by=newest)
        where = f"experiment {experiment!r}"
    else:
        found = logger.search(SWEEPS, order_by=newest, max_results=1, all_experiments=True)
        where = "any experiment"
    if not found:
        raise UserError(f"no sweep in {where} at {uri}; run one with lesson7-train -m ...")
    return logger, found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description="Show a sweep's trials, best first, swept parameters as "
                                "columns.")
    p.add_argument("parent_run_id", nargs="?", help="the sweep's parent run (default: the latest sweep)")
    p.add_argument("--experiment", help="show every sweep of this experiment, newest first")
    p.add_argument("--csv", action="store_true", help="print CSV (every trial, all columns) instead of a table")
    p.add_argument("--tracking-uri", help="the MLflow store (default: MLFLOW_TRACKING_URI, else lesson7-train's)")
    args = p.parse_args(argv)
    try:
        logger, found = parents(args.tracking_uri or default_uri(), args.parent_run_id, args.experiment)
        summaries = [trial_table(logger, parent) for parent in found]
        if args.csv:  # one CSV: the sweeps' rows under the union of their columns
            table = pd.concat([s.table.assign(sweep=s.parent_id) for s in summaries])
            csv_safe(table).to_csv(sys.stdout, index=False)
        for summary in summaries if not args.csv else []:
            render(summary.table, summary.title)
    except UserError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
