"""THE training loop: fit (train + evaluate + checkpoint + log) and the lesson's lr finder.

Everything arrives built (model, data, optimizer, schedule, logger); this module only runs it.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.optim import Optimizer
from tqdm.auto import tqdm

from lesson7_sweeps import checkpoint as ckpt
from lesson7_sweeps import fast, graphs
from lesson7_sweeps.config import compile_mode, is_multi_objective
from lesson7_sweeps.models.rnn import generate
from lesson7_sweeps.schedules import Schedule
from lesson7_sweeps.tracking import Logger

log = logging.getLogger(__name__)
BETA = 0.98  # the lesson's smoothing of the reported training loss (debiased EWMA)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says at which step."""


def reset_state(model: nn.Module) -> None:
    """Fresh hidden state for stateful models (epoch start, evaluation); no-op for the others, and for
    a model with reset_hidden=false (the lesson's had no reset(): its state carries on throughout)."""
    if getattr(model, "reset_hidden", False):
        model.reset()


def set_lr(optimizer: Optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


@dataclass
class Precision:
    """How batches run: bf16 autocast and channels_last pay off for convolutions on CUDA only."""

    autocast: torch.dtype | None
    channels_last: bool

    @classmethod
    def choose(cls, tc: DictConfig, device: torch.device, image: bool) -> Precision:
        auto = device.type == "cuda" and image
        bf16 = tc.precision == "bf16" or (tc.precision == "auto" and auto)
        last = tc.channels_last == "on" or (tc.channels_last == "auto" and auto)
        return cls(torch.bfloat16 if bf16 else None, last)

    def context(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None)

    def prepare(self, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class Step:
    """How train_step runs: the forward + loss (eager or compiled), the bucket width that a
    compiled text step pads its sections to (None: no padding), and with trainer.cuda_graph the
    whole step captured per bucket (graphs.py). fast.py says why losses are unchanged."""

    loss: fast.LossFn
    width: int | None
    graphed: graphs.GraphedStep | None

    @classmethod
    def choose(cls, tc: DictConfig, model: nn.Module) -> Step:
        mode = compile_mode(tc.compile)
        width = fast.bucket_width(model, mode != "off" or tc.cuda_graph, tc.bptt_bucket)
        graphed = graphs.GraphedStep(width, capture=_device(model).type == "cuda") if tc.cuda_graph else None
        return cls(fast.loss_function(mode, bucketed=width is not None), width, graphed)


def train_step(model: nn.Module, optimizer: Optimizer, x: Tensor, y: Tensor, tc: DictConfig, prec: Precision,
               how: Step) -> Tensor:
    """forward -> loss -> backward -> clip -> step; returns the loss, still on the device."""

    def update(x: Tensor, y: Tensor, steps: Tensor | None) -> Tensor:  # also what a CUDA graph captures
        with prec.context(x.device):
            loss = how.loss(model, prec.prepare(x), y, steps, tc.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
        optimizer.step()
        return loss.detach().float()  # bf16 under CPU autocast; the bookkeeping is fp32

    if how.graphed is not None:  # padded, copied into the bucket's captured step, replayed
        return how.graphed(model, optimizer, x, y, update)
    steps = None
    if how.width is not None:  # a compiled text step: one graph per bucket of lengths
        x, y, steps = fast.pad_section(x, y, fast.bucket(x.size(0), how.width))
    return update(x, y, steps)


@torch.no_grad()
def evaluate(model: nn.Module, data: Any, prec: Precision, limit: int | None = None) -> dict[str, float]:
    """val_loss (nats per target), val_accuracy; for text val_bpc (bits per character); for images
    unless data.tta=none, val_accuracy_tta (probabilities averaged over the test-time views).
    data.val_average=batches weighs every batch alike (fastai 0.7's validate: np.mean of the batch
    means), =samples every target; TTA accuracy is over samples (the lesson's accuracy_np on all).
    `limit`: the first that many validation batches only (data.eval_limit: quick trials)."""
    model.eval()
    reset_state(model)
    tta = data.kind == "image" and data.tta != "none"
    generator = data.tta_generator() if tta else None  # the same draws at every evaluation
    by_batch = data.val_average == "batches"
    loss_sum = torch.zeros((), device=_device(model))
    correct, correct_tta = torch.zeros_like(loss_sum), torch.zeros_like(loss_sum)
    n, n_samples = 0, 0
    for x, y in itertools.islice(data.valid, limit):
        with prec.context(x.device):
            out = model(prec.prepare(x)).float()
            if tta:  # view 0 is the image itself: reuse its output
                views = data.tta_views(x, generator)[1:]
                probs = out.exp() + sum(model(prec.prepare(v)).float().exp() for v in views)
                correct_tta += (probs.argmax(-1) == y).sum()
        weight = 1 / y.numel() if by_batch else 1.0
        loss_sum += F.nll_loss(out, y, reduction="sum") * weight
        correct += (out.argmax(-1) == y).sum() * weight
        n, n_samples = n + (1 if by_batch else y.numel()), n_samples + y.numel()
    model.train()
    reset_state(model)
    metrics = {"val_loss": loss_sum.item() / n, "val_accuracy": correct.item() / n}
    if data.kind == "text":
        metrics["val_bpc"] = metrics["val_loss"] / math.log(2)
    if tta:
        metrics["val_accuracy_tta"] = correct_tta.item() / n_samples
    return metrics


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _progress(iterable: Any, enabled: str, desc: str, total: int, initial: int) -> tqdm:
    disable = {"on": False, "off": True, "auto": not sys.stderr.isatty()}[enabled]
    return tqdm(iterable, desc=desc, total=total, initial=initial, disable=disable, leave=False, dynamic_ncols=True)


def fit(cfg: DictConfig, model: nn.Module, data: Any, optimizer: Optimizer, schedule: Schedule,
        logger: Logger, out_dir: Path, start: dict[str, Any] | None = None,
        report: Callable[[int, float, bool], bool] | None = None) -> dict[str, float]:
    """Train for trainer.epochs (or until trainer.max_steps); returns the last evaluation's metrics
    with the last epoch's throughput and the train_time so far.

    `start` is a checkpoint to continue from exactly (resume); SIGINT/SIGTERM save one and stop.
    `report(step, objective, may_prune)` is called after each evaluation (a sweeper's pruner); True
    stops training there, which ends normally with the metrics so far."""
    tc = cfg.trainer
    device = _device(model)
    prec = Precision.choose(tc, device, data.kind == "image")
    how = Step.choose(tc, model)
    smooth = torch.zeros((), device=device)  # EWMA of the loss, kept on the device
    first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, or -1
    readback = fast.Readback()  # train_loss and first_bad at log points, read without waiting
    epoch0, batch0, step, metrics, stop = 0, 0, 0, {}, False
    train_time = 0.0  # seconds spent in training steps in this process (evaluation not counted)
    if start is not None:  # continue exactly where the checkpoint was taken
        model.load_state_dict(start["model"])
        optimizer.load_state_dict(start["optimizer"])
        data.train.load_state_dict(start["loader"], start["batch"])
        epoch0, batch0, step = start["epoch"], start["batch"], start["step"]
        smooth.fill_(start["smooth"])
        first_bad.fill_(start["first_bad"])
        metrics = start["metrics"]
        # the time of the epochs the checkpoint completed (its metrics; a checkpoint of an earlier
        # version has none): train_time is an objective, a resumed trial must not look faster
        train_time = metrics.get("train_time", 0.0)
        ckpt.set_rng_states(start["rng"])

    def check_finite(bad: float | None = None) -> None:  # without `bad`: a host sync (epoch ends, saves)
        bad = int(first_bad.item() if bad is None else bad)
        if bad >= 0:
            raise TrainingDiverged(f"loss became NaN or infinite at step {bad}")

    def log_landed(wait: bool) -> None:  # the log points whose values have reached the host
        for (at, lr), (train_loss, bad) in readback.landed(wait):
            check_finite(bad)
            logger.log_metrics({"train_loss": train_loss, "lr": lr}, at)
            bar.set_postfix(loss=f"{train_loss:.4f}")

    def validate() -> dict[str, float]:
        out = evaluate(model, data, prec, cfg.data.eval_limit)
        if not math.isfinite(out["val_loss"]):
            raise TrainingDiverged(f"validation loss became {out['val_loss']} after step {step}")
        return out

    def save(name: str, epoch: int, batch: int) -> None:
        log_landed(wait=True)
        logger.flush()  # the stored metrics reach at least as far as the checkpoint
        check_finite()  # never save a diverged model over the last good one
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "config": OmegaConf.to_container(cfg, resolve=True), "epoch": epoch, "batch": batch,
                 "step": step, "smooth": smooth.item(), "first_bad": int(first_bad.item()), "metrics": metrics,
                 "loader": data.train.state_dict(), "hidden": getattr(model, "h", None), "rng": ckpt.rng_states()}
        logger.log_artifact(ckpt.save(out_dir / name, state), "checkpoints")

    with ckpt.stop_requests() as signals:
        epoch = epoch0 - 1  # a run resumed after its last epoch (stopped while sampling) trains no more
        for epoch in range(epoch0, tc.epochs):
            model.train()
            if epoch == epoch0 and start is not None and start["hidden"] is not None:  # resumed: the carried
                model.h = start["hidden"]  # state (mid-epoch, or at an epoch start with reset_hidden=false)
            if batch0 == 0:
                reset_state(model)
            n_batches = len(data.train)  # exact for this epoch, even with random BPTT lengths
            bar = _progress(data.train, tc.progress, f"epoch {epoch + 1}/{tc.epochs}", n_batches, batch0)
            started, n_targets, paused = time.perf_counter(), 0, 0.0
            evaluated = False  # this step's evaluation is done: a report inside the epoch stopped training
            for i, (x, y) in enumerate(bar, start=batch0):
                # ---- lr from the schedule (a pure function of the position in epochs) -> one step
                pos, next_pos = epoch + i / n_batches, epoch + (i + 1) / n_batches
                set_lr(optimizer, schedule(pos))
                loss = train_step(model, optimizer, x, y, tc, prec, how)
                step, n_targets = step + 1, n_targets + y.numel()
                # ---- bookkeeping stays on the device: no host-device sync in the hot loop
                smooth.lerp_(loss, 1 - BETA)
                first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
                if schedule.resets_optimizer(pos, next_pos):  # the notebook's next fit() builds a new optimizer
                    graphs.reset_optimizer(optimizer, captured=how.graphed is not None)  # moments start again
                if step % tc.log_every == 0:  # (on a GPU, values logged land a step or more later)
                    values = torch.stack([smooth / (1 - BETA**step), first_bad.float()])  # debiased loss
                    readback.record((step, optimizer.param_groups[-1]["lr"]), values)
                    log_landed(wait=False)
                for cycle in schedule.cycles_ended(pos, next_pos) if tc.keep_cycle_checkpoints else []:
                    save(f"cycle_{cycle}.pt", epoch, i + 1)
                if signals:  # SIGINT / SIGTERM: stop here, where every state is consistent
                    save("last.pt", epoch, i + 1)
                    raise ckpt.stopping(signals, saved=True)
                stop = tc.max_steps is not None and step >= tc.max_steps
                if stop:
                    break
                if tc.eval_every is not None and step % tc.eval_every == 0 and i + 1 < n_batches:
                    # inside the epoch (its end evaluates anyway): a pruner can stop a trial sooner
                    began, hidden = time.perf_counter(), getattr(model, "h", None)
                    metrics = validate()
                    if hidden is not None:  # evaluation reset it; training carries its own state on
                        model.h = hidden
                    logger.log_metrics(metrics, step)
                    paused += time.perf_counter() - began
                    # (a timing objective is known at epoch ends only)
                    if report is not None and cfg.objective in metrics and report(step, metrics[cfg.objective], True):
                        stop = evaluated = True
                        break
            check_finite()  # also waits for the device, so the clock below is honest
            elapsed = time.perf_counter() - started - paused
            train_time += elapsed
            throughput = n_targets / elapsed  # characters or images per second
            log_landed(wait=True)
            bar.close()
            batch0 = 0
            evaluation = {} if evaluated else validate()
            logger.log_metrics({**evaluation, "epoch": epoch + 1, "throughput": throughput, "train_time": train_time},
                               step)
            log.info("epoch %d step %d: %s", epoch + 1, step, ", ".join(f"{k} {v:.4f}" for k, v in
                                                                        (evaluation or metrics).items()))
            metrics = {**metrics, **evaluation, "throughput": throughput, "train_time": train_time}
            final = stop or epoch + 1 == tc.epochs
            if report is not None and not evaluated:  # (a report inside the epoch stopped it: reported)
                # the last evaluation is reported too, but never pruned: a trial trained to its end is complete
                stop = report(step, metrics[cfg.objective], not final) or final
            else:
                stop = final
            if stop:
                break
            if tc.checkpoints or signals:  # every epoch: what a crashed run resumes from; a stopped one's always
                save("last.pt", epoch + 1, 0)
            if signals:
                raise ckpt.stopping(signals, saved=True)
        if tc.checkpoints:
            save("final.pt", epoch + 1, 0)
        if data.kind == "text" and tc.sample.chars > 0:
            try:
                prompt = data.vocab.encode(data.prepare(tc.sample.prompt)).to(device)
                ids = generate(model, prompt, tc.sample.chars, tc.sample.temperature)
                logger.log_text(tc.sample.prompt + data.vocab.decode(ids), "sample.txt")
            except Exception as e:  # a by-product: it never fails a run that trained
                log.warning("the text sample failed, the run is kept: %s: %s", type(e).__name__,
                            (str(e).splitlines() or [""])[0])
        if signals:  # during the last evaluation or the sample: resume finds training done
            save("last.pt", epoch + 1, 0)
            raise ckpt.stopping(signals, saved=True)
    if not is_multi_objective(cfg.objective):  # one name, whatever the objective (several keep their own)
        logger.log_metrics({"objective": metrics[cfg.objective]}, step)
    return metrics


def lr_find(cfg: DictConfig, model: nn.Module, data: Any, optimizer: Optimizer, logger: Logger,
            out_dir: Path) -> float:
    """The lesson's learning-rate finder. lr grows exponentially from start_lr to end_lr over
    num_steps (every layer group keeps its ratio to the last group); it stops once the smoothed
    loss exceeds stop_factor x the best seen. Logs the loss-vs-lr plot; returns the lr at the
    lowest smoothed loss divided by 10 (a usual pick)."""
    fc, tc = cfg.trainer.lr_finder, cfg.trainer
    prec = Precision.choose(tc, _device(model), data.kind == "image")
    how = Step.choose(tc, model)
    last_base = optimizer.param_groups[-1]["base_lr"]
    lrs: list[float] = []
    losses: list[float] = []
    smooth, best = 0.0, math.inf
    model.train()
    with ckpt.stop_requests() as signals:
        for step, (x, y) in enumerate(_endless(model, data.train), start=1):
            if signals:  # nothing to resume: the finder is a short diagnostic
                raise ckpt.stopping(signals, saved=False)
            lr = fc.start_lr * (fc.end_lr / fc.start_lr) ** ((step - 1) / (fc.num_steps - 1))
            set_lr(optimizer, lr / last_base)
            loss = train_step(model, optimizer, x, y, tc, prec, how).item()  # a diagnostic: syncing is fine
            smooth = BETA * smooth + (1 - BETA) * loss
            debiased = smooth / (1 - BETA**step)
            lrs.append(lr)
            losses.append(debiased)
            logger.log_metrics({"lr_find_loss": debiased, "lr_find_lr": lr}, step)
            best = min(best, debiased)
            if not math.isfinite(debiased) or debiased > fc.stop_factor * best or step >= fc.num_steps:
                break
        suggestion = lrs[losses.index(min(losses))] / 10
        logger.log_artifact(_plot_lr_find(lrs, losses, suggestion, out_dir / "lr_find.png"))
        if signals:
            raise ckpt.stopping(signals, saved=False)
    log.info("lr finder: %d steps, lowest loss %.4f at lr %.2e; suggested lr %.2e", step, min(losses),
             suggestion * 10, suggestion)
    return suggestion


def _endless(model: nn.Module, loader: Any) -> Any:
    """Epochs of `loader` back to back, with a fresh hidden state at each epoch start."""
    while True:
        reset_state(model)
        yield from loader


def _plot_lr_find(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lrs, losses)
    ax.axvline(suggestion, color="tab:red", linestyle="--", label=f"suggested lr {suggestion:.1e}")
    ax.set(xscale="log", xlabel="learning rate (last layer group)", ylabel="smoothed training loss",
           title="lr finder")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
