"""`lesson7-rerun RUN_ID [OVERRIDE ...]`: train exactly what an MLflow run trained, again, and compare.

    lesson7-rerun 3f2a9c...                         # same config, same store; refuses if the data changed
    lesson7-rerun 3f2a9c... trainer.device=cpu      # a GPU run, again on CPU
    lesson7-rerun 3f2a9c... --strict                # refuse unless the code is provably the run's
    lesson7-rerun 3f2a9c... --tracking-uri http://mlflow:5000   # or MLFLOW_TRACKING_URI=...

The run's config.yaml artifact (resolved) is read as data and rebuilt from this checkout's conf/
options into a typed, validated config (`stored.rebuild_config`: nothing in it can choose code), the
code version and the data are compared with the run's, and the new run (tagged `rerun_of`, and
`config_notes` when the rebuild upgraded or dropped settings) goes to the same store. Its final
metrics are printed next to the original's.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lesson7_sweeps.checkpoint import interrupt_signal
from lesson7_sweeps.errors import ConfigError, UserError
from lesson7_sweeps.runner import TrainingDiverged
from lesson7_sweeps.stored import apply_overrides, default_uri, notes_tag, read_run, rebuild_config
from lesson7_sweeps.sweeps.names import printable
from lesson7_sweeps.tracking import git_tags
from lesson7_sweeps.train import train_run

PROG = "lesson7-rerun"
TIMING_METRICS = frozenset({"throughput", "train_time"})  # wall-clock measurements: never equal between two runs


def check_code(run_tags: dict[str, str], strict: bool) -> None:
    """Compare the run's git commit and dirty flag with the project checkout's: warn on stderr, or
    with `strict` raise, unless both are the same commit with no uncommitted changes."""
    now = git_tags()

    def describe(tags: dict[str, str]) -> str:
        if "git_commit" not in tags:
            return "an unknown commit"
        return tags["git_commit"][:12] + (" + uncommitted changes" if tags.get("git_dirty") != "false" else "")

    if "git_commit" in now and describe(run_tags) == describe(now) and now["git_dirty"] == "false":
        return
    problem = f"the code may differ from the run's: it ran at {describe(run_tags)}, this checkout is at {describe(now)}"
    if strict:
        raise UserError(f"{problem} (--strict)")
    print(f"{PROG}: warning: {problem}", file=sys.stderr)


def comparison(original: dict[str, float], rerun: dict[str, float]) -> str:
    """An aligned table of the final metrics both runs have, and a verdict that ignores timing metrics."""
    names = sorted(original.keys() & rerun.keys())
    rows = [("metric", "original", "rerun", "difference")]
    for name in names:
        a, b = original[name], rerun[name]
        diff = "(timing)" if name in TIMING_METRICS else "0" if a == b else f"{b - a:+.3g}"
        rows.append((printable(name), repr(a), repr(b), diff))  # a metric's name is the store's data
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3] for r in rows]
    compared = [n for n in names if n not in TIMING_METRICS]
    differ = [n for n in compared if original[n] != rerun[n]]
    timing = [n for n in names if n in TIMING_METRICS]
    verdict = (f"{len(differ)} of {len(compared)} final metrics differ: {printable(', '.join(differ))}" if differ
               else f"all {len(compared)} final metrics are identical")
    lines.append(verdict + (f" (timing, not compared: {', '.join(timing)})" if timing else ""))
    return "\n".join(lines)


# --- the command -------------------------------------------------------------------------------


def rerun(args: argparse.Namespace) -> None:
    """Read the run, check it, rebuild its config, train it again, print the comparison."""
    uri = args.tracking_uri or default_uri()
    client, run, stored = read_run(uri, args.run_id)
    check_code(run.data.tags, args.strict)
    cfg, notes = rebuild_config(stored, run.data.tags, force=args.force)
    for note in notes:
        print(f"{PROG}: warning: {note}", file=sys.stderr)
    if "uri" not in cfg.tracking:
        raise ConfigError(f"tracking._target_={cfg.tracking._target_}: the run was not tracked to MLflow, "
                          f"so its rerun cannot be compared with it")
    apply_overrides(cfg, args.overrides)
    cfg.tracking.uri = uri
    fingerprint = run.data.params.get("dataset.fingerprint")
    if fingerprint is None and not args.force:
        print(f"{PROG}: warning: the run recorded no dataset.fingerprint; the data cannot be checked", file=sys.stderr)
    tags = {"rerun_of": args.run_id, "rerun_overrides": " ".join(args.overrides), **notes_tag(notes)}
    outcome = train_run(cfg, tags=tags, expect_data=None if args.force else fingerprint)
    new = client.get_run(outcome.run_id)
    if fingerprint is not None and new.data.params.get("dataset.fingerprint") != fingerprint:
        print(f"{PROG}: warning: the rerun trained on other data than the run (--force)", file=sys.stderr)
    where = uri
    if uri.startswith(("http://", "https://")):  # a link into the MLflow UI
        where = f"{uri.rstrip('/')}/#/experiments/{new.info.experiment_id}/runs/{new.info.run_id}"
    print(f"rerun of {args.run_id}: new run {new.info.run_id} in experiment '{cfg.tracking.experiment}' at {where}")
    print(comparison(run.data.metrics, new.data.metrics))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Train an MLflow run's exact config again, check the code "
                                "and data versions, and compare the final metrics.")
    p.add_argument("run_id", help="the MLflow run to reproduce")
    p.add_argument("overrides", nargs="*", help="Hydra-style key=value overrides applied to the run's config "
                   "(e.g. trainer.device=cpu); recorded in the tag rerun_overrides")
    p.add_argument("--tracking-uri", help="the MLflow store of the run, where the rerun goes too "
                   "(default: MLFLOW_TRACKING_URI, else lesson7-train's default store)")
    p.add_argument("--strict", action="store_true", help="refuse unless the checkout is the run's commit, clean")
    p.add_argument("--force", action="store_true", help="train even if the data differs from the run's, and drop "
                   "settings the current code no longer has")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry; returns the exit code: 0, 1 (training diverged), 2 (a user error, one line)."""
    args = parser().parse_intermixed_args(argv)
    # epoch lines on stderr, as lesson7-train prints them through Hydra's logging
    handler, pkg = logging.StreamHandler(sys.stderr), logging.getLogger("lesson7_sweeps")
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    level, propagate = pkg.level, pkg.propagate
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)
    pkg.propagate = False  # mlflow.pytorch.log_model gives the root logger a handler: each line would print twice
    try:
        rerun(args)
        return 0
    except (UserError, TrainingDiverged) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    except KeyboardInterrupt as e:
        name, code = interrupt_signal(e)
        print(f"{PROG}: interrupted by {name}", file=sys.stderr)
        return code
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(level)
        pkg.propagate = propagate


if __name__ == "__main__":
    sys.exit(main())
