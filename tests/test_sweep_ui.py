"""A sweep's saved view (lesson7_sweeps.sweeps.ui) as a real store keeps it; the browser test shows it."""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient

from lesson7_sweeps.sweeps.ui import VIEW_TAG_PREFIX, sweep_view_tag, sweep_view_url


def test_the_view_tag_is_a_saved_view_an_mlflow_store_accepts(tmp_path: Path):
    swept = [f"model.layers.{i}" for i in range(12)] + ["optim.lr"]  # a long key list still fits a tag
    key, value = sweep_view_tag("2026-11-28_19-05-00", "sweep lr×layers", swept, 1_700_000_000_000,
                                lower_is_better=False)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.create_experiment("views")
    client.set_experiment_tag(experiment_id, key, value)  # MLflow checks the key's characters and the length
    stored = client.get_experiment(experiment_id).tags[VIEW_TAG_PREFIX + "2026-11-28_19-05-00"]

    envelope = json.loads(stored)  # what the UI's Views menu lists: name, createdAt, state
    assert (envelope["name"], envelope["createdAt"]) == ("sweep lr×layers", 1_700_000_000_000)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == "tags.sweep_id = '2026-11-28_19-05-00'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`objective`", False)  # best (highest) first
    assert state["selectedColumns"] == ["metrics.`objective`", *(f"params.`{k}`" for k in swept),
                                        "tags.`trial_state`"]  # PRUNED trials stand out
    assert set(state["columnWidths"]) <= set(state["columnOrder"])  # MLflow sizes only ordered columns
    (parallel,) = [c for c in state["compareRunCharts"] if c["type"] == "PARALLEL"]
    assert (parallel["selectedParams"], parallel["selectedMetrics"]) == (swept, ["objective"])
    sections = {s["uuid"] for s in state["compareRunSections"]}
    assert {c["metricSectionId"] for c in state["compareRunCharts"]} <= sections


def test_the_view_link_needs_a_tracking_server():
    assert sweep_view_url("http://127.0.0.1:5000/", "3", "abc", view="CHART") == (
        "http://127.0.0.1:5000/#/experiments/3/runs?viewStateShareKey=abc&compareRunsMode=CHART")
    assert sweep_view_url("sqlite:////tmp/mlflow.db", "3", "abc") is None
