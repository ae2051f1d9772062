"""Runner vs a plain PyTorch loop on the lesson-6 LSTM: characters per second, and the ratio.

Both sides train the same model shape (n_fac 42, 512 x 2 LSTM, dropout 0.5) on the same batchified
Nietzsche text with the same section lengths (same seed), for the same number of steps, in one
process, alternating, several times; we print the median of each and the median ratio.
The runner side is the real thing: `train(cfg)` with `experiment=lesson6_lstm`, MLflow logging to a
temporary sqlite store, throughput read back from the run (timed over the training steps only).
With `--compile MODE` the runner trains with trainer.compile=MODE (and model.cell=loop, which the
compiled step pads to buckets of lengths), the compile time inside its timing; then one eager and
one compiled run of the same seed report the largest difference between their train_loss series.
`--cuda-graph` does the same with trainer.cuda_graph=true (the whole step captured with
torch.cuda.graph per bucket of lengths; on the CPU the same step, uncaptured).

    python benchmarks/bench_lstm.py --steps 300 --repeats 3 [--device cuda] [--text PATH] [--compile MODE]
                                    [--cuda-graph]

`--optimizer-step` measures the optimizer step alone instead, on the lesson6_lstm parameters with
fixed random gradients: eager fused Adam (what compiled and captured steps use) vs eager foreach /
single-tensor Adam (the default) vs torch.compile of a function calling opt.step() (PyTorch's
pattern: lr as a tensor, filled each step as a schedule does, so it never recompiles); per-step
times after the compile, the compile time, the largest parameter difference from fused after
--steps steps, and the graphs compiled (more than one: a recompile).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import compare, runner_losses, runner_throughput, write_json  # benchmarks/common.py
from hydra import compose, initialize_config_dir
from torch import nn

from lesson7_sweeps.data.text import TextData
from lesson7_sweeps.train import CONF_DIR

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared/data/nietzsche.txt"


class PlainLSTM(nn.Module):
    """The notebook's CharSeqStatefulLSTM, as a PyTorch user would write it."""

    def __init__(self, vocab_size: int, n_fac: int = 42, n_hidden: int = 512, n_layers: int = 2) -> None:
        super().__init__()
        self.e = nn.Embedding(vocab_size, n_fac)
        self.rnn = nn.LSTM(n_fac, n_hidden, n_layers, dropout=0.5)
        self.l_out = nn.Linear(n_hidden, vocab_size)
        self.h = None

    def forward(self, cs: torch.Tensor) -> torch.Tensor:
        if self.h is None or self.h[0].size(1) != cs.size(1):
            zeros = torch.zeros(self.rnn.num_layers, cs.size(1), self.rnn.hidden_size, device=cs.device)
            self.h = (zeros, zeros.clone())
        out, h = self.rnn(self.e(cs), self.h)
        self.h = tuple(t.detach() for t in h)
        return F.log_softmax(self.l_out(out), dim=-1).view(-1, self.l_out.out_features)


def plain(text: Path, steps: int, device: str, seed: int) -> float:
    """Characters per second of a minimal loop: same data, lengths, model shape, Adam 1e-2 wd 1e-5."""
    torch.manual_seed(seed)
    data = TextData(str(text), None, "", True, 3, 0.2, None, 64, 8, True, "lesson", "lesson", "batches", 2**30,
                    device=device, seed=seed)
    model = PlainLSTM(len(data.vocab)).to(device)
    opt = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=1e-5)
    n, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(data.train):
        loss = F.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += y.numel()
        if i + 1 == steps:
            break
    loss.item()  # wait for the device
    return n / (time.perf_counter() - start)


def compiled_step(opt: torch.optim.Optimizer):
    """PyTorch's pattern for a compiled optimizer: compile a function that calls opt.step()."""

    @torch.compile
    def step() -> None:
        opt.step()

    return step


def optimizer_step(steps: int, device: str) -> dict[str, float]:
    """See the module's docstring (`--optimizer-step`)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    shapes = [p.detach() for p in PlainLSTM(85).to(device).parameters()]  # Nietzsche's vocabulary
    grads = [torch.randn_like(p) * 1e-2 for p in shapes]
    result = {}
    finals = {}
    for side in ("fused", "default", "compiled"):
        params = [p.clone().requires_grad_() for p in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        lr = torch.tensor(1e-2, device=device) if side == "compiled" else 1e-2
        opt = torch.optim.Adam(params, lr=lr, weight_decay=1e-5, fused=True if side == "fused" else None)
        step = compiled_step(opt) if side == "compiled" else opt.step
        counters.clear()
        started = time.perf_counter()
        step()  # the compile, for the compiled side
        result[f"{side}_first_step_s"] = time.perf_counter() - started
        started = time.perf_counter()
        for i in range(1, steps):
            if side == "compiled":
                opt.param_groups[0]["lr"].fill_(1e-2 * (1 - i / steps))  # a schedule's change: no recompile
            else:
                opt.param_groups[0]["lr"] = 1e-2 * (1 - i / steps)
            step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        result[f"{side}_ms_per_step"] = 1e3 * (time.perf_counter() - started) / (steps - 1)
        finals[side] = params
        if side == "compiled":
            result["compiled_graphs"] = counters["stats"]["unique_graphs"]  # 1 unless an lr change recompiled
    for side in ("default", "compiled"):
        result[f"{side}_max_param_diff_vs_fused"] = max(
            (a - b).abs().max().item() for a, b in zip(finals[side], finals["fused"]))
    saved = result["fused_ms_per_step"] - result["compiled_ms_per_step"]
    result["break_even_steps"] = (result["compiled_first_step_s"] * 1e3 / saved) if saved > 0 else float("inf")
    for k, v in result.items():
        print(f"  {k}: {v:.4g}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--compile", default="off", help="trainer.compile of the runner side (off | default | ...)")
    ap.add_argument("--cuda-graph", action="store_true", help="the runner side with trainer.cuda_graph=true")
    ap.add_argument("--optimizer-step", action="store_true", help="time the optimizer step alone (see above)")
    ap.add_argument("--override", action="append", default=[], help="another Hydra override for the runner side")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()

    fast = args.compile != "off" or args.cuda_graph  # the runner side pads to buckets: the loop cell

    def run(fn, seed: int, mode: str, graph: bool, *extra: str):
        cell = ["model.cell=loop"] if fast else []  # the eager side of the loss comparison too
        with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return fn(compose("train", overrides=[
                "experiment=lesson6_lstm", f"data.path={args.text}", f"seed={seed}", f"trainer.device={args.device}",
                "trainer.epochs=1", f"trainer.max_steps={args.steps}", "trainer.sample.chars=0",
                "trainer.checkpoints=false", "trainer.progress=off", f"tracking.uri=sqlite:///{tmp}/mlflow.db",
                f"tracking.artifact_location={tmp}/artifacts", "tracking.experiment=bench",
                f"trainer.compile={mode}", f"trainer.cuda_graph={graph}", *cell, *args.override, *extra]))

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    if args.optimizer_step:
        print(f"Adam step on the lesson6_lstm parameters, {args.steps} steps, {name}, torch {torch.__version__}")
        write_json(args.json, bench="lstm_optimizer_step", device=name, steps=args.steps,
                   **optimizer_step(args.steps, args.device))
        return
    print(f"lesson6_lstm bs 64 bptt 8, {args.steps} steps x {args.repeats}, {name}, torch {torch.__version__}, "
          f"runner trainer.compile={args.compile} trainer.cuda_graph={args.cuda_graph}")
    result = compare(args.repeats, lambda seed: run(runner_throughput, seed, args.compile, args.cuda_graph),
                     lambda seed: plain(args.text, args.steps, args.device, seed), "chars/s")
    if fast:  # the same training, eager and compiled / captured: the largest train_loss difference
        eager, compiled = (run(runner_losses, 0, mode, graph, "trainer.log_every=1", "model.dropout=0.0")
                           for mode, graph in (("off", False), (args.compile, args.cuda_graph)))
        result["max_loss_diff"] = max(abs(a - b) for a, b in zip(eager, compiled))
        print(f"train_loss, compiled/captured vs eager ({len(eager)} steps, dropout 0): largest difference "
              f"{result['max_loss_diff']:.2e}")
    write_json(args.json, bench="lstm", device=name, compile=args.compile, cuda_graph=args.cuda_graph,
               steps=args.steps, unit="chars/s", **result)


if __name__ == "__main__":
    main()
