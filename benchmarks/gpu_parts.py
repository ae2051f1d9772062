"""The parts of benchmarks/gpu_check.sh that are not bench_lstm.py / bench_cifar.py; each writes
OUT/<part>.json when it is done. `table` turns every JSON under OUT into the Markdown table for
BENCHMARKS.md; `tiny-data` writes the rehearsal's text and images. Uses only what the GPU image has
plus the wheelhouse (hydra-core, omegaconf, mlflow, optuna).

    python benchmarks/gpu_parts.py curve OUT NAME TARGET_METRIC TARGET OVERRIDE...
    python benchmarks/gpu_parts.py sync OUT OVERRIDE...
    python benchmarks/gpu_parts.py graphed OUT STEPS OVERRIDE...
    python benchmarks/gpu_parts.py determinism OUT OVERRIDE...
    python benchmarks/gpu_parts.py parallel OUT N_TRIALS N_JOBS OVERRIDE...

Training subprocesses get the part's time (env PART_S, set by gpu_check.sh) less a margin to report.
    python benchmarks/gpu_parts.py table OUT [--check PART ...]
    python benchmarks/gpu_parts.py tiny-data DIR
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _store(tmp: str) -> list[str]:
    return [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_location={tmp}/artifacts",
            "tracking.experiment=gpu_check", "tracking.log_model=false", "trainer.progress=off",
            "trainer.sample.chars=0", f"hydra.run.dir={tmp}/run", f"hydra.sweep.dir={tmp}/sweep"]


def _runs(tmp: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("gpu_check")
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def _history(tmp: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(f"sqlite:///{tmp}/mlflow.db").get_metric_history(run_id, key))


def _train(log: Path, tmp: str, timeout: float, *overrides: str, multirun: bool = False) -> tuple[int, float]:
    """lesson7-train in a process of its own, its output in `log` (a time-out keeps the epochs it
    finished); (exit code, wall seconds)."""
    started = time.perf_counter()
    with log.open("w") as f:
        try:
            rc = subprocess.run([sys.executable, "-m", "lesson7_sweeps.train", *(["-m"] if multirun else []),
                                 *_store(tmp), *overrides],
                                timeout=timeout, stdout=f, stderr=subprocess.STDOUT).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - started


def curve(out: Path, name: str, metric: str, target: float, timeout: float, overrides: list[str]) -> dict:
    """Train a preset; per epoch its training seconds and `metric`; the training time at which the
    metric first reaches `target` (accuracies: >=, losses: <=). A time-out keeps the epochs done."""
    with tempfile.TemporaryDirectory() as tmp:
        rc, wall = _train(out / f"{name}.train.log", tmp, timeout, *overrides)
        runs = _runs(tmp)  # none if it failed before training (its log says why)
        values = dict(_history(tmp, runs[0].info.run_id, metric)) if runs else {}
        times = _history(tmp, runs[0].info.run_id, "train_time") if runs else []
    better = (lambda v: v >= target) if "accuracy" in metric else (lambda v: v <= target)
    epochs = [{"train_time": t, metric: values[step]} for step, t in times]
    reached = next((e["train_time"] for e in epochs if better(e[metric])), None)
    first, last = (epochs[0][metric], epochs[-1][metric]) if epochs else (None, None)
    improved = len(epochs) > 1 and (last > first if "accuracy" in metric else last < first)
    return {"part": name, "rc": rc, "wall_s": wall, "metric": metric, "target": target, "epochs": epochs,
            "time_to_target_s": reached, "final": last, "improved_over_first_epoch": improved}


def sync(out: Path, overrides: list[str]) -> dict:
    """One epoch of the runner's loop under torch.cuda.set_sync_debug_mode("error"): any host-device
    sync inside the epoch raises (on the CPU, where nothing syncs, the epoch just runs)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lesson7_sweeps import runner
    from lesson7_sweeps.optim import build_optimizer
    from lesson7_sweeps.schedules import Schedule
    from lesson7_sweeps.tracking import NullLogger
    from lesson7_sweeps.train import CONF_DIR, build_data, pick_device

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["tracking=none", "trainer.epochs=2", "trainer.checkpoints=false",
                                          "trainer.log_every=1", "trainer.progress=off", *overrides])
    device = pick_device(cfg.trainer.device)
    data = build_data(cfg, device)
    model = instantiate(cfg.model, **data.model_args()).to(device)
    cuda = device.type == "cuda"

    class Guarded:  # the training loader; its passes (each epoch's whole loop) run in the debug mode
        def __init__(self, loader) -> None:
            self.loader = loader

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):
            if cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                yield from self.loader
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")

    data.train = Guarded(data.train)
    started = time.perf_counter()
    error = None
    try:  # epoch 1 compiles (if asked) and warms up; epoch 2 is what counts, under the same mode
        metrics = runner.fit(cfg, model, data, build_optimizer(cfg.optim, model), Schedule(cfg.schedule.phases, 2),
                             NullLogger(), out)
    except RuntimeError as e:
        error, metrics = str(e).splitlines()[0], {}
    return {"part": "sync", "device": str(device), "sync_debug_mode": "error" if cuda else "n/a (cpu)",
            "syncs_in_epoch": "none" if error is None else error, "wall_s": time.perf_counter() - started,
            **{k: v for k, v in metrics.items() if k.startswith("val_")}}


def graphed(out: Path, steps: int, overrides: list[str]) -> dict:
    """trainer.cuda_graph on the device: the same seed's `steps` training steps through
    runner.train_step three ways: the eager step (no padding, the default optimizer), the
    cuda_graph step uncaptured (padded buckets, fused Adam: the same kernels) and captured.
    Characters per second of each (captures included), and the largest per-step loss difference
    of the captured step from the uncaptured one (the capture itself: ~0) and from eager (rounding,
    grown by training: see BENCHMARKS.md's drift section)."""
    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lesson7_sweeps import graphs, runner
    from lesson7_sweeps.optim import build_optimizer
    from lesson7_sweeps.train import CONF_DIR, build_data, pick_device

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["tracking=none", "model.cell=loop", "model.dropout=0.0", *overrides])
    device = pick_device(cfg.trainer.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    result: dict = {"part": "lstm_graphed", "device": str(device), "steps": steps}
    losses = {}
    for side in ("eager", "uncaptured", "captured"):
        tc = cfg.trainer.copy()
        tc.cuda_graph = side != "eager"
        torch.manual_seed(cfg.seed)
        data = build_data(cfg, device)
        model = instantiate(cfg.model, **data.model_args()).to(device)
        optimizer = build_optimizer(cfg.optim, model, fused=tc.cuda_graph)
        runner.set_lr(optimizer, 1.0)
        how = runner.Step.choose(tc, model)
        if side == "uncaptured":
            how.graphed = graphs.GraphedStep(how.graphed.width, capture=False)
        prec = runner.Precision.choose(tc, device, False)
        out, chars = [], 0
        sync()
        started = time.perf_counter()
        for x, y in data.train:
            out.append(runner.train_step(model, optimizer, x, y, tc, prec, how))
            chars += y.numel()
            if len(out) == steps:
                break
        sync()
        result[f"{side}_chars_per_s"] = chars / (time.perf_counter() - started)
        losses[side] = torch.stack(out).tolist()
        if side == "captured":
            result["graphs"] = len(how.graphed.graphs)
            result["captured_on_device"] = how.graphed.capture  # False on the CPU: the same step, uncaptured
    for ref in ("uncaptured", "eager"):
        result[f"max_loss_diff_vs_{ref}"] = max(abs(a - b) for a, b in zip(losses["captured"], losses[ref]))
    result["speedup_vs_eager"] = result["captured_chars_per_s"] / result["eager_chars_per_s"]
    return result


def determinism(out: Path, overrides: list[str]) -> dict:
    """The same config twice in this process with trainer.deterministic=true: the largest difference
    of any metric, and of the train_loss logged at every step."""
    from hydra import compose, initialize_config_dir

    from lesson7_sweeps.train import CONF_DIR, train_run

    with tempfile.TemporaryDirectory() as tmp:
        for i in range(2):
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("train", overrides=[*_store(tmp)[:-2], "trainer.deterministic=true",
                                                  "trainer.log_every=1", "trainer.checkpoints=false",
                                                  f"tracking.run_name=rerun{i}", *overrides])
            train_run(cfg)
        a, b = sorted(_runs(tmp), key=lambda r: r.info.run_name)
        diffs = {k: abs(a.data.metrics[k] - b.data.metrics[k]) for k in a.data.metrics
                 if k not in ("throughput", "train_time")}
        curve_a, curve_b = (_history(tmp, r.info.run_id, "train_loss") for r in (a, b))
    diffs["train_loss (every step)"] = max(abs(x - y) for (_, x), (_, y) in zip(curve_a, curve_b))
    return {"part": "determinism", "max_diff": max(diffs.values()), "diffs": diffs}


def parallel(out: Path, n_trials: int, n_jobs: int, timeout: float, overrides: list[str]) -> dict:
    """A sweep's trials one after another, then n_jobs at a time on the same device: trials per hour."""
    rates = {}
    for jobs in (1, n_jobs):
        with tempfile.TemporaryDirectory() as tmp:
            rc, wall = _train(out / f"parallel_{jobs}.log", tmp, timeout, *overrides,
                              f"hydra.sweeper.n_trials={n_trials}", f"hydra.sweeper.n_jobs={jobs}",
                              f"hydra.launcher.n_jobs={jobs}", multirun=True)
            done = sum(r.info.status == "FINISHED" and "trial" in r.data.tags for r in _runs(tmp))
        if done == 0:
            raise SystemExit(f"no trial finished with {jobs} job(s) at a time (rc {rc}): see parallel_{jobs}.log")
        rates[f"jobs_{jobs}"] = {"rc": rc, "wall_s": wall, "trials_done": done, "trials_per_hour": 3600 * done / wall}
    return {"part": "parallel", "n_trials": n_trials, **rates,
            "speedup": rates[f"jobs_{n_jobs}"]["trials_per_hour"] / max(rates["jobs_1"]["trials_per_hour"], 1e-9)}


def _row(d: dict) -> tuple[str, str]:
    """(part, its figures in one cell) for the table."""
    part = d.get("part") or d.get("bench")
    if "skipped" in d or "failed" in d:
        return part, f"**{'skipped: ' + d['skipped'] if 'skipped' in d else 'failed: ' + str(d['failed'])}**"
    if "ratio" in d:
        extra = f"; vs eager: train_loss max diff {d['max_loss_diff']:.1e}" if "max_loss_diff" in d else ""
        graph = ", cuda_graph" if d.get("cuda_graph") else ""
        return (f"{d['bench']} (compile {d['compile']}{graph})", f"runner {d['runner']:,.0f} {d['unit']}, plain "
                f"{d['plain']:,.0f}, ratio {d['ratio']:.3f} ({d['steps']} steps){extra}")
    if "time_to_target_s" in d:
        reached = "not reached" if d["time_to_target_s"] is None else f"{d['time_to_target_s']:.1f} s"
        return part, (f"{d['metric']} {d['final']} after {len(d['epochs'])} epochs "
                      f"({d['epochs'][-1]['train_time'] if d['epochs'] else 0:.1f} s of training); "
                      f"target {d['target']}: {reached}; rc {d['rc']}")
    if part == "lstm_graphed":
        return part, (f"{d['steps']} steps, {d['graphs']} graphs: captured {d['captured_chars_per_s']:,.0f} chars/s, "
                      f"uncaptured {d['uncaptured_chars_per_s']:,.0f}, eager {d['eager_chars_per_s']:,.0f} "
                      f"(x{d['speedup_vs_eager']:.2f}); loss max diff vs uncaptured "
                      f"{d['max_loss_diff_vs_uncaptured']:.1e}, vs eager {d['max_loss_diff_vs_eager']:.1e}")
    if part == "sync":
        return part, f"set_sync_debug_mode {d['sync_debug_mode']}: syncs in the epoch: {d['syncs_in_epoch']}"
    if part == "determinism":
        return part, f"largest metric difference between two deterministic runs: {d['max_diff']:.2e}"
    if part == "parallel":
        jobs = [k for k in d if k.startswith("jobs_")]
        return part, "; ".join(f"{k.replace('_', ' ')}: {d[k]['trials_per_hour']:.0f} trials/h" for k in jobs) + \
            f"; speed-up {d['speedup']:.2f}"
    return part, json.dumps(d)[:200]


def table(out: Path, check: list[str]) -> int:
    """Print the Markdown table of every OUT/*.json; with --check, fail unless each named part wrote
    one that is neither skipped nor failed (and, for a training curve, improved on its first epoch)."""
    results = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}
    lines = ["| part | result |", "|---|---|", *(f"| {a} | {b} |" for a, b in map(_row, results.values()))]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    print(text)
    bad = [p for p in check if p not in results or {"skipped", "failed"} & results[p].keys()
           or results[p].get("improved_over_first_epoch") is False]  # a preset that did not learn
    if bad:
        print(f"missing, skipped or failed parts: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


def tiny_data(root: Path) -> None:
    """The rehearsal's data: 12k characters of simple English, and 10 classes x 24 images (train)
    and 8 (test) of 32x32 noise tinted by class, in the lesson's class-folder layout."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    sentences = ["the cat sat on the mat.", "we walked to the old mill.", "she reads a book at night.",
                 "a bird sang in the tree.", "the sun is warm today."]
    (root / "text.txt").write_text(" ".join(rng.choice(sentences, 500)) + "\n")
    for split, n in (("train", 24), ("test", 8)):
        for label in range(10):
            folder = root / "cifar" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(n):
                image = rng.integers(0, 100, (32, 32, 3), dtype=np.uint8)
                image[..., label % 3] += np.uint8(15 * label)
                Image.fromarray(image).save(folder / f"{i}.png")


def _time_left() -> float:
    """The part's seconds (PART_S) less what starting Python and reporting take."""
    return float(os.environ.get("PART_S", "600")) - 8


def main() -> int:
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "tiny-data":
        tiny_data(Path(args[0]))
        return 0
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    if cmd == "table":
        return table(out, args[2:] if args[1:2] == ["--check"] else [])
    if cmd == "curve":
        name, metric, target, *overrides = args[1:]
        result = curve(out, name, metric, float(target), _time_left(), overrides)
    elif cmd == "sync":
        result = sync(out, args[1:])
    elif cmd == "graphed":
        result = graphed(out, int(args[1]), args[2:])
    elif cmd == "determinism":
        result = determinism(out, args[1:])
    elif cmd == "parallel":
        n_trials, n_jobs, *overrides = args[1:]
        result = parallel(out, int(n_trials), int(n_jobs), (_time_left() - 2) / 2, overrides)
    else:
        raise SystemExit(f"unknown part {cmd}; see the docstring")
    name = result["part"]
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result)[:1000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
