"""A sweep in the real MLflow UI: `mlflow server` on loopback, a real multirun against it, and the
experiment's runs page in headless Chromium, read back from the DOM as a user would see it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from lesson7_sweeps.sweeps.ui import VIEW_TAG_PREFIX, sweep_view_url

from .conftest import tiny_overrides
from .test_tracking_server import Server

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():  # CI installs it (.ci/run); Playwright's own browsers are never downloaded
    pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install chromium", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")

SWEPT = ["data.bptt", "model.n_hidden"]
TIMEOUT_MS = 60_000  # MLflow's UI is a large JS bundle: on 2 busy cores the first render takes seconds


@pytest.fixture
def server(tmp_path: Path):
    srv = Server(tmp_path)
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def run_sweep(server: Server, tmp_path: Path, text: Path) -> None:
    cmd = [sys.executable, "-m", "lesson7_sweeps.train", "-m", *tiny_overrides(tmp_path, text),
           "trainer.epochs=1", "trainer.max_steps=5", "data.bptt=6,8", "model.n_hidden=16,32",
           f"tracking.uri={server.uri}", "tracking.experiment=ui-test", f"hydra.sweep.dir={tmp_path}/multirun"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def cell(page, row_index: int, key: str) -> str:
    """A cell's text; the grid draws a row in parts (pinned name column, scrolled columns) that share
    its row-index."""
    return page.locator(f'[role="row"][row-index="{row_index}"] [col-id="{key}"]').first.inner_text().strip()


def test_a_sweep_shows_in_the_mlflow_ui_with_its_params_and_objective(server, browser, tmp_path: Path,
                                                                      text_file: Path):
    run_sweep(server, tmp_path, text_file)
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name("ui-test")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get("run_type") == "sweep"]
    assert len(parents) == 1, f"a sweep makes one parent run (tag run_type=sweep), found {len(parents)}"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 == len(runs) - 1
    sweep_id = parent.data.tags["sweep_id"]
    assert VIEW_TAG_PREFIX + sweep_id in experiment.tags, "the sweep did not save its view on the experiment"

    page = browser.new_page(viewport={"width": 1600, "height": 900})
    page.set_default_timeout(TIMEOUT_MS)

    # 1. The experiment's runs page as MLflow opens it: the parent, its trials nested under it.
    page.goto(f"{server.uri}/#/experiments/{experiment.experiment_id}/runs")
    close_assistant(page)
    parent_row = page.locator('[role="row"]', has_text=parent.info.run_name).first
    parent_row.wait_for()
    names = sorted(r.info.run_name for r in children)
    assert len(set(names)) == 4
    if not page.get_by_text(names[0], exact=True).is_visible():
        parent_row.locator('[col-id="attributes.`Run Name`"] button').first.click()  # the "+" expander
    child_rows = [page.locator('[role="row"]', has_text=name).first for name in names]
    for row in child_rows:
        row.wait_for()
    parent_index = int(parent_row.get_attribute("row-index"))
    assert sorted(int(r.get_attribute("row-index")) for r in child_rows) == list(range(parent_index + 1,
                                                                                          parent_index + 5))
    grid = page.locator(".ag-root").bounding_box()
    bottom = max(box["y"] + box["height"] for box in (row.bounding_box() for row in child_rows))
    page.screenshot(path=tmp_path / "ui-sweep-nested.png", clip={**grid, "height": bottom - grid["y"]})

    # 2. The sweep's saved view, picked from the Views menu: its runs sorted by the objective, the
    # swept params and the objective as columns.
    view_name = json.loads(experiment.tags[VIEW_TAG_PREFIX + sweep_id])["name"]
    page.locator('[data-testid="saved-views-trigger"]').click()
    page.get_by_role("menuitem", name=view_name).click()
    page.wait_for_url(f"**viewStateShareKey={sweep_id}**")
    header = page.locator(".ag-header")
    for key in [*SWEPT, "objective"]:
        header.get_by_text(key, exact=True).first.wait_for()
    shown = []
    for child in children:
        name = page.locator('[role="row"]', has_text=child.info.run_name).first
        name.wait_for()
        index = int(name.get_attribute("row-index"))
        assert [cell(page, index, f"params.`{k}`") for k in SWEPT] == [child.data.params[k] for k in SWEPT]
        objective = float(cell(page, index, "metrics.`objective`"))
        assert objective == pytest.approx(child.data.metrics["objective"], rel=1e-3)
        shown.append((index, objective))
    assert [o for _, o in sorted(shown)] == sorted(o for _, o in shown)  # best trial first
    page.screenshot(path=tmp_path / "ui-sweep-runs.png")

    # 3. The view's charts, by the link a sweep prints: the objective in parallel coordinates over the
    # swept params.
    page.goto(sweep_view_url(server.uri, experiment.experiment_id, sweep_id, view="CHART"))
    card = page.locator('[data-testid="experiment-view-compare-runs-card"]', has_text="Parallel").first
    for axis in [*SWEPT, "objective"]:
        card.locator("svg text", has_text=axis).first.wait_for()
    page.screenshot(path=tmp_path / "ui-sweep-parallel.png")
    print(f"screenshots in {tmp_path}")


def close_assistant(page) -> None:
    """MLflow 3.17 opens its chat assistant beside the page; close it so screenshots show the runs."""
    button = page.locator('[data-component-id="mlflow.assistant.chat_panel.close"]')
    page.get_by_text("Training runs").first.wait_for()
    if button.count():
        button.first.click()
