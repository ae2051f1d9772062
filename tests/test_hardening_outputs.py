"""Issue 15, classes 2 and 3: what a sweep prints, renders and writes cannot carry markup, escapes or
formulas, and its summary is never lost. Hostile names and values are planted in a real sqlite store
as any writer of a shared store could; the summary, lesson7-compare and the pre-flight read them back."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lesson7_sweeps.sweeps import summary
from lesson7_sweeps.sweeps.compare import main as compare_main
from lesson7_sweeps.sweeps.parent import Parent, SweepSpec
from lesson7_sweeps.tracking import MlflowLogger

from .conftest import run_cli, seed_store, tiny_overrides

ESCAPES = "\x1b[31mred\x1b]0;pwned\x07"  # a colour, and a window title ended by BEL
MARKUP = "[/x] [bold]not bold"
FORMULA = '=HYPERLINK("http://evil.example","click")'
XSS = "<img src=x onerror=alert(1)>"
TEX = "$\\notacmd{$"


@pytest.fixture
def hostile_sweep(tmp_path: Path) -> tuple[str, str]:
    """A sweep's parent and three finished trials whose names, swept values and direction are hostile."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    seed_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri)
    exp = client.create_experiment("test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name=f"sweep {XSS}", tags={
        "run_type": "sweep", "sweep_id": "abcd1234", "swept": "trainer.sample.prompt,objective",
        "objective": "val_loss", "direction": XSS}).info.run_id
    for i, (name, prompt) in enumerate([(ESCAPES, TEX), (MARKUP, "ab"), (FORMULA, "-x")]):
        run = client.create_run(exp, run_name=name, tags={"mlflow.parentRunId": parent, "trial": str(i)}).info.run_id
        client.log_param(run, "trainer.sample.prompt", prompt)
        client.log_param(run, "objective", "val_loss")
        client.log_metric(run, "objective", 1.0 + i)
        client.set_terminated(run)
    return uri, parent


def no_raw_controls(text: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[31mred" in text


def test_lesson7_compare_prints_names_as_plain_text(hostile_sweep, capsys):
    uri, parent = hostile_sweep
    assert compare_main([parent, "--tracking-uri", uri]) == 0  # markup used to raise rich's MarkupError
    out = capsys.readouterr().out
    no_raw_controls(out)
    assert "[/x] [bold]not bold" in out and "swept.objective" in out  # a swept objective: its own column
    assert compare_main([parent, "--tracking-uri", uri, "--csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    no_raw_controls(str(rows))
    assert {r["run_name"] for r in rows} >= {"'" + FORMULA, MARKUP} and "-x" not in {
        r["prompt"] for r in rows}  # '-x' would be a formula too: it is "'-x"
    assert {r["objective"] for r in rows} == {"1.0", "2.0", "3.0"}  # numbers stay numbers


def test_the_summary_escapes_every_name_and_survives_math_text(hostile_sweep, tmp_path: Path, capsys):
    uri, parent_id = hostile_sweep
    logger = MlflowLogger(uri, "test", None, None, heartbeat_s=30, stale_after_s=300)
    logger.prepare()
    logger.run_id = parent_id
    exp = MlflowClient(uri).get_run(parent_id).info.experiment_id
    result = summary.write_summary(Parent(logger, "abcd1234", SweepSpec({}, {}), "val_loss", exp))
    client = MlflowClient(uri)
    folder = Path(client.download_artifacts(parent_id, "", str(tmp_path / "dl")))
    assert {p.name for p in folder.iterdir()} == {"summary.csv", "summary.html", "objective_vs_params.png",
                                                 "parallel_coordinates.png"}  # TeX-like labels drawn as text
    html = (folder / "summary.html").read_text()
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html.split("</h3>")[0]
    assert "\x1b" not in html and "[/x]" in html
    cells = [c for row in csv.reader(io.StringIO((folder / "summary.csv").read_text())) for c in row]
    assert "'" + FORMULA in cells and FORMULA not in cells and "\x1b" not in "".join(cells)
    assert client.get_run(parent_id).data.tags["best_run_id"]
    result.print()
    no_raw_controls(capsys.readouterr().out)


def test_a_plot_that_fails_loses_only_itself(hostile_sweep, tmp_path: Path, monkeypatch):
    uri, parent_id = hostile_sweep

    def broken(*args):
        raise ValueError("a math-text parser error, say")

    monkeypatch.setattr(summary, "_parallel_coordinates", broken)
    logger = MlflowLogger(uri, "test", None, None, heartbeat_s=30, stale_after_s=300)
    logger.prepare()
    logger.run_id = parent_id
    summary.write_summary(Parent(logger, "abcd1234", SweepSpec({}, {}), "val_loss", "0"))
    client = MlflowClient(uri)
    names = {a.path for a in client.list_artifacts(parent_id)}
    assert names == {"summary.csv", "summary.html", "objective_vs_params.png"}
    assert "best_run_id" in client.get_run(parent_id).data.tags


@pytest.mark.parametrize(("argv", "message"), [
    (["objective=val_loss,val_accuracy"], "objective=val_loss,val_accuracy: one sweep compares its trials by one "
                                          "objective, in one store and experiment"),
    (["tracking.experiment=expA,expB"], "tracking.experiment=expA,expB: one sweep compares"),
    (["hydra/sweeper=optuna", "optim.lr=interval(5,1)"], "optim.lr=interval(5,1): use interval(low, high) with low "
                                                         "< high"),
    (["hydra/sweeper=optuna", "optim.lr=tag(log,interval(0,1))"], "(and low > 0 on a log scale)"),
    (["hydra/sweeper=optuna", "optim.lr=interval(1e-4,1e-2)", "hydra.sweeper.n_trials=0"], "n_trials=0"),
    (["hydra/sweeper=optuna", "optim.lr=interval(1e-4,1e-2)", f"hydra.sweeper.direction='{XSS}'"],
     f"hydra.sweeper.direction={XSS} is invalid: use minimize, maximize or null"),
])
def test_sweeps_that_cannot_be_summarised_are_refused_before_anything_exists(monkeypatch, capsys, tmp_path: Path,
                                                                             text_file: Path, argv, message):
    argv = ["-m", *tiny_overrides(tmp_path, text_file, fresh_store=True), *argv, f"hydra.sweep.dir={tmp_path}/sweep"]
    code, err, out = run_cli(monkeypatch, capsys, tmp_path, argv)
    assert code == 2 and len(err) == 1 and err[0].startswith("lesson7-train: error: ") and message in err[0], err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "sweep").exists() and not out
