"""Where the compiled-vs-eager train_loss drift of the lesson-6 LSTM comes from (BENCHMARKS.md).

The same training (512x2 loop-cell LSTM, bs 64, bptt 8 with random lengths, Adam, dropout 0, same
seed) through the runner's own step (runner.train_step: padding to buckets, the compiled loss, the
hidden state handed from batch to batch) in several variants, each against the eager reference;
the per-step loss (not the smoothed train_loss) is compared:

    compiled   trainer.compile=default + fused Adam (what bench_lstm.py --compile compares)
    fused      eager + fused Adam: the optimizer's kernel alone
    nudged     eager, every initial weight multiplied by (1 + 1e-7): a rounding-sized difference

A bug in the state hand-off or the bucketing shows at lr 0 (nothing learns, so rounding cannot
grow): the compiled losses then differ from eager by far more than rounding. Chaos shows as a
difference that starts at rounding size and grows with the step and with lr, the same for the
nudged run, which shares every line of code with the reference.

    python benchmarks/drift_lstm.py --text ../shared/data/nietzsche.txt [--steps 150] [--lrs 0 1e-3 1e-2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lesson7_sweeps import runner
from lesson7_sweeps.optim import build_optimizer
from lesson7_sweeps.train import CONF_DIR, build_data


def losses(text: Path, steps: int, lr: float, variant: str, overrides: list[str]) -> list[float]:
    """The per-step training loss of `steps` steps of one variant (see the module's docstring)."""
    mode = "default" if variant == "compiled" else "off"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=lesson6_lstm", f"data.path={text}", "data.cache_dir=/tmp/l7cache", "model.cell=loop",
            "model.dropout=0.0", f"optim.lr={lr}", f"trainer.compile={mode}", *overrides])
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, "cpu")
    model = instantiate(cfg.model, **data.model_args())
    if variant == "nudged":
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + 1e-7)
    optimizer = build_optimizer(cfg.optim, model, fused=variant in ("compiled", "fused"))
    runner.set_lr(optimizer, 1.0)
    how = runner.Step.choose(cfg.trainer, model)
    prec = runner.Precision.choose(cfg.trainer, torch.device("cpu"), False)
    out = []
    for x, y in data.train:
        out.append(runner.train_step(model, optimizer, x, y, cfg.trainer, prec, how).item())
        if len(out) == steps:
            return out
    raise SystemExit(f"the text has fewer than {steps} training batches")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.0, 1e-3, 1e-2])
    ap.add_argument("--variants", nargs="+", default=["compiled", "fused", "nudged"])
    ap.add_argument("--override", action="append", default=[], help="another Hydra override (both sides)")
    ap.add_argument("--json", type=Path, help="also write the per-step differences to this file")
    args = ap.parse_args()
    at = [s for s in (1, 2, 5, 10, 25, 50, 100, 150, 300) if s <= args.steps]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; |loss - eager loss| at step "
          f"{', '.join(map(str, at))}; max")
    result = {}
    for lr in args.lrs:
        eager = losses(args.text, args.steps, lr, "eager", args.override)
        for variant in args.variants:
            diff = [abs(a - b) for a, b in zip(losses(args.text, args.steps, lr, variant, args.override), eager)]
            result[f"{variant} lr {lr:g}"] = diff
            print(f"lr {lr:<6g} {variant:8s} " + " ".join(f"{diff[s - 1]:.1e}" for s in at) + f" | {max(diff):.1e}",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
