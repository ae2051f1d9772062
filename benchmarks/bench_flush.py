"""What waiting for the stored metrics costs a checkpoint (MlflowLogger.flush, run before each one):
a real sqlite store, `--batches` async metric batches logged per epoch (one per log point), then a
flush; prints the median wait per checkpoint and the same epoch's logging without any flush.
    python benchmarks/bench_flush.py --epochs 10 --batches 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from lesson7_sweeps.tracking import MlflowLogger


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batches", type=int, default=20)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        lg = MlflowLogger(f"sqlite:///{tmp}/m.db", "bench", None, "flush", heartbeat_s=60, stale_after_s=600)
        lg.prepare()
        lg.start("flush", {}, {})
        logging_s, flush_s = [], []
        for e in range(a.epochs):
            t = time.perf_counter()
            for s in range(a.batches):
                lg.log_metrics({"train_loss": 1.0, "lr": 0.1}, e * a.batches + s)
            logging_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            lg.flush()
            flush_s.append(time.perf_counter() - t)
        lg.close("FINISHED")
    print(f"{a.batches} batches an epoch: logging {statistics.median(logging_s) * 1000:.1f} ms, "
          f"flush {statistics.median(flush_s) * 1000:.1f} ms (median of {a.epochs} epochs)")


if __name__ == "__main__":
    main()
