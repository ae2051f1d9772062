"""A sweep's view in the MLflow UI: the runs table with the swept params and the objective as
columns, and a parallel-coordinates chart of the objective, saved once per sweep as an experiment tag.

MLflow 3's experiment page has no per-experiment default columns: a first visit shows only the
attribute columns, and later visits whatever that browser kept in its local storage. What it does
have are saved views ("Views" menu, "Save & share view" link): one experiment tag per view,
`mlflow.sharedViewState.<id>`, whose value is `{"name", "createdAt", "state"}` with `state` the page's
serialized search facets + UI state (plain JSON is accepted beside MLflow's deflated form), opened by
`#/experiments/<id>/runs?viewStateShareKey=<id>` or from the Views menu.

The view sorts by the objective, which lists the trials as flat rows, best first (MLflow nests
children under their parent only in its default sort, by start time). Nested rows would not do here:
a view cannot expand a parent (MLflow drops `runsExpanded` from shared state), and the charts draw
only the rows on screen, so a collapsed parent would leave the parallel-coordinates plot empty.
(mlflow/server/js/src/experiment-tracking/components/experiment-page/utils/savedViewEnvelope.ts,
hooks/useSharedExperimentViewState.ts, models/ExperimentPageUIState.tsx.)

Pure functions: no MLflow call here; tracking.py writes the tag.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # MLflow UI's key prefix for saved/shared views
OBJECTIVE_METRIC = "objective"
# MLflow's runs-chart sections: metrics without a "/" land in "Model metrics"; the UI expects these
# two last, and puts any other section (ours) above them
MODEL_SECTION, SYSTEM_SECTION = "Model metrics", "System metrics"
STATE_TAG = "trial_state"
NAME_COLUMNS = ("attributes.`Run Name`", "attributes.`Created`", "attributes.`Duration`")  # always shown


def _column(kind: str, key: str) -> str:
    """MLflow's canonical column key, e.g. params.`data.bptt` (backquotes: keys may hold dots)."""
    return f"{kind}.`{key}`"


def sweep_view_state(sweep_id: str, swept: Sequence[str], lower_is_better: bool = True,
                     objectives: Sequence[str] = ()) -> dict:
    """The runs page state that shows one sweep: its runs (parent and trials, by their `sweep_id`
    tag) sorted by the objective, the swept params and the objective as columns, and a chart section
    with the objective in parallel coordinates over the swept params and as bars per trial. With
    several `objectives` (their metric names), those metrics instead, sorted by the first."""
    section = f"sweep-{sweep_id}"
    metrics = list(objectives) if len(objectives) > 1 else [OBJECTIVE_METRIC]
    # trial_state: PRUNED for a trial the pruner stopped (MLflow shows every such run as FINISHED)
    columns = [*(_column("metrics", m) for m in metrics), *(_column("params", k) for k in swept),
               _column("tags", STATE_TAG)]
    card = {"uuid": "", "metricSectionId": section, "deleted": False, "isGenerated": False, "runsCountToCompare": 100}
    return {
        # search facets (what the runs page also reads from its URL)
        "searchFilter": f"tags.sweep_id = '{sweep_id}'",
        "orderByKey": _column("metrics", metrics[0]),
        "orderByAsc": lower_is_better,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "modelVersionFilter": "All Runs",
        "datasetsFilter": [],
        # UI state
        "selectedColumns": columns,
        # MLflow applies widths only to the columns named in columnOrder, so name them all, in its order
        "columnOrder": [*NAME_COLUMNS, *columns],
        "columnWidths": {c: max(120, 8 * len(c)) for c in columns},  # room for a long key or a float
        "runsHiddenMode": "SHOW_ALL",  # charts: every trial, not MLflow's first 10
        "compareRunCharts": [
            {**card, "uuid": f"{section}-parallel", "type": "PARALLEL", "selectedParams": list(swept),
             "selectedMetrics": metrics, "showAllRuns": True},
            {**card, "uuid": f"{section}-bar", "type": "BAR", "metricKey": metrics[0]},
        ],
        "compareRunSections": [
            {"uuid": section, "name": "Sweep", "display": True, "isReordered": False, "deleted": False,
             "isGenerated": False, "columns": 2},  # two wide cards a row (MLflow's default: three)
            *({"uuid": f"{section}-{i}", "name": name, "display": True, "isReordered": False, "deleted": False,
               "isGenerated": True} for i, name in enumerate((MODEL_SECTION, SYSTEM_SECTION))),
        ],
        "isAccordionReordered": False,
        "hideEmptyCharts": True,
    }


def sweep_view_tag(sweep_id: str, name: str, swept: Sequence[str], created_ms: int,
                   lower_is_better: bool = True, objectives: Sequence[str] = ()) -> tuple[str, str]:
    """(key, value) of the experiment tag that saves the sweep's view under `name` in the UI's Views
    menu; the view's id is the sweep id."""
    state = json.dumps(sweep_view_state(sweep_id, swept, lower_is_better, objectives), separators=(",", ":"))
    envelope = {"name": name, "createdAt": created_ms, "updatedAt": created_ms, "state": state}
    return VIEW_TAG_PREFIX + sweep_id, json.dumps(envelope, separators=(",", ":"))


def sweep_view_url(tracking_uri: str, experiment_id: str, sweep_id: str, view: str = "TABLE") -> str | None:
    """Link to the sweep's saved view on a tracking server (view TABLE or CHART); None for a local
    store, which has no UI until `mlflow ui` serves it (its address is then the user's choice)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return (f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs"
            f"?viewStateShareKey={sweep_id}&compareRunsMode={view}")
