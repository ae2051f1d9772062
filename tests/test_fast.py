"""trainer.compile: bucketing, the state held over padding, and compiled training equal to eager
(inductor's C++ backend on the CPU, tiny models: a compile takes seconds, not minutes)."""

from __future__ import annotations

import traceback
import weakref

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch._dynamo.utils import counters
from torch.overrides import TorchFunctionMode

from lesson7_sweeps import fast, graphs, runner
from lesson7_sweeps.config import compile_mode, validate
from lesson7_sweeps.errors import ConfigError
from lesson7_sweeps.models.rnn import CharRNN
from lesson7_sweeps.optim import build_optimizer
from lesson7_sweeps.schedules import Schedule
from lesson7_sweeps.tracking import NullLogger
from lesson7_sweeps.train import CONF_DIR, build_data

from .test_train_vision import vision_cfg  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(NullLogger):
    """Every logged metric, by name: [(step, value), ...]."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[int, float]]] = {}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, v))


def test_lengths_share_a_bucket_up_to_its_width():
    assert [fast.bucket(n, 8) for n in (1, 5, 8, 9, 16, 17, 30)] == [8, 8, 8, 16, 16, 24, 32]
    assert [fast.bucket(n, 1) for n in (5, 9)] == [5, 9]


def test_old_booleans_read_as_modes():
    assert [compile_mode(s) for s in ("True", "False", "reduce-overhead")] == ["default", "off", "reduce-overhead"]


def test_cuda_graph_refuses_a_compile_mode():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["trainer.cuda_graph=true", "trainer.compile=reduce-overhead"])
    with pytest.raises(ConfigError, match=r"^trainer\.cuda_graph=True is invalid: needs trainer\.compile=off"):
        validate(cfg)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_padded_section_gives_the_same_loss_gradients_and_state(kind: str):
    """Padding a section (token 0 in, IGNORE as target) and telling the model its real length gives
    what the unpadded section gives: the mean loss over real targets, their gradients, and the
    state after the last real step (handed to the next batch)."""
    torch.manual_seed(0)
    model = CharRNN(11, kind, 4, 16, 2, 0.0, "loop", stateful=True, reset_hidden=True)
    x, y = torch.randint(1, 11, (5, 3)), torch.randint(0, 11, (15,))
    h0 = model.init_hidden(3, torch.device("cpu"))
    results = []
    for padded in (False, True):
        model.zero_grad()
        model.h = h0
        xs, ys, steps = fast.pad_section(x, y, 8) if padded else (x, y, None)
        loss = fast.model_loss(model, xs, ys, steps, 0.1)
        loss.backward()
        results.append((loss, model.h, [p.grad.clone() for p in model.parameters()]))
    (loss, h, grads), (loss_p, h_p, grads_p) = results
    assert fast.pad_section(x, y, 8)[0].shape == (8, 3)
    torch.testing.assert_close(loss_p, loss)
    torch.testing.assert_close(h_p, h)
    for g_p, g in zip(grads_p, grads):
        torch.testing.assert_close(g_p, g)


def fit_losses(make_cfg, tmp_path, *overrides: str) -> tuple[list[float], dict[str, float], torch.nn.Module]:
    """Train through runner.fit (the real loop) and return the per-step train_loss and the metrics."""
    cfg = make_cfg("trainer.epochs=1", "trainer.max_steps=50", "trainer.log_every=1", "trainer.checkpoints=false",
                   "trainer.sample.chars=0", *overrides, tracking=False)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, "cpu")
    model = instantiate(cfg.model, **data.model_args())
    fused = compile_mode(cfg.trainer.compile) != "off" or cfg.trainer.cuda_graph  # as train.py builds it
    optimizer = build_optimizer(cfg.optim, model, fused=fused)
    recorder = Recorder()
    metrics = runner.fit(cfg, model, data, optimizer, Schedule(cfg.schedule.phases, cfg.trainer.epochs), recorder,
                         tmp_path)
    return [v for _, v in recorder.metrics["train_loss"]], metrics, model


def test_cuda_graph_step_on_the_cpu_trains_as_eager(make_cfg, tmp_path):
    """trainer.cuda_graph's own logic, which the CPU runs uncaptured: the batch padded into its
    bucket's static buffers, the state copied in and handed back, the lr as tensors, the warm-up
    undone. 50 steps of random lengths over 2 buckets, an epoch end, an SGDR restart (Adam's state
    zeroed in place) and dropout: every loss, the weights and the carried state as in eager."""
    phases = ("[{kind: constant, epochs: 1, lr_mult: 1.0, reset_optimizer: false}, {kind: sgdr, epochs: null,"
              " lr_mult: 1.0, reset_optimizer: true, cycle_len: 1, cycle_mult: 2, warmup_frac: 0.05, warmup: phase}]")
    tiny = ("model.cell=loop", "model.n_layers=2", "model.dropout=0.0", "data.bs=16", "data.random_bptt=true",
            "trainer.epochs=2", f"schedule.phases={phases}", "trainer.checkpoints=false")
    eager, eager_metrics, eager_model = fit_losses(make_cfg, tmp_path, *tiny)
    graphed = {}
    real_init = graphs.Graph.__init__

    def init(self, model, x, y, steps):  # every buffer set made: one per bucket
        real_init(self, model, x, y, steps)
        graphed[tuple(x.shape)] = self

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(graphs.Graph, "__init__", init)
        losses, metrics, model = fit_losses(make_cfg, tmp_path, *tiny, "trainer.cuda_graph=true")
    assert sorted(graphed) == [(8, 16), (16, 16)]  # lengths 1-8 and 9-16: two buckets
    assert len(losses) == len(eager) == 50 and eager[-1] < eager[0] - 0.3
    assert max(abs(a - b) for a, b in zip(losses, eager)) < 1e-5
    assert metrics["val_loss"] == pytest.approx(eager_metrics["val_loss"], abs=1e-5)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # inductor's C++ compile: ~35-75 s on 2 cores with a cold cache
def test_compiled_lstm_trains_as_eager(make_cfg, tmp_path):
    """Same seed, fp32, 50 steps of random BPTT lengths 5..15, padded to one bucket of 16 steps (one
    graph: each C++ compile costs ~20 s here): every smoothed loss, the evaluation and the weights
    as in the eager run."""
    tiny = ("model.cell=loop", "data.random_bptt=true", "schedule=onecycle", "trainer.bptt_bucket=16")
    eager, eager_metrics, eager_model = fit_losses(make_cfg, tmp_path, *tiny)
    counters.clear()
    compiled, metrics, model = fit_losses(make_cfg, tmp_path, *tiny, "trainer.compile=default")
    assert counters["stats"]["unique_graphs"] == 1  # 10 different lengths, one graph
    assert len(compiled) == len(eager) == 50
    assert eager[-1] < eager[0] - 0.3  # it trained: a comparison of two idle runs would prove nothing
    assert max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-5
    assert metrics["val_loss"] == pytest.approx(eager_metrics["val_loss"], abs=1e-5)
    for p, q in zip(model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


@pytest.mark.slow  # inductor's C++ compile: ~35-75 s on 2 cores with a cold cache
def test_compiled_resnet2_trains_as_eager(vision_cfg, tmp_path):  # noqa: F811
    """The lesson's Resnet2 (scratch batch norm, tiny widths, no dropout: compiled code draws other
    dropout masks) on real images: one epoch of 9 steps compiled, every loss as in eager fp32."""
    images = ("data.tta=none", "model=resnet2", "model.layers=[4,8]", "model.dropout=0.0", "optim.lr=0.01")
    eager, eager_metrics, _ = fit_losses(vision_cfg, tmp_path, *images)
    compiled, metrics, _ = fit_losses(vision_cfg, tmp_path, *images, "trainer.compile=default")
    assert len(compiled) == len(eager) == 9 and eager[-1] < eager[0]
    assert max(abs(a - b) for a, b in zip(compiled, eager)) < 1e-5
    assert metrics["val_loss"] == pytest.approx(eager_metrics["val_loss"], abs=1e-5)


# what makes the host wait for the device: a value read back, or a shape that depends on the data
SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
         "masked_select", "unique", "repeat_interleave"}


class SyncWatch(TorchFunctionMode):
    """Records every call that would sync the host with the device while `inside` is set. A
    non-blocking copy into host memory does not wait, and neither does reading it once it has landed
    (fast.Readback asks an event first): those are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.inside, self.syncs = False, []
        self.async_copies: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # by id

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        out = func(*args, **kwargs)
        if name == "copy_" and kwargs.get("non_blocking"):  # into host memory, without waiting
            self.async_copies[id(out)] = out
            return out
        to_host = name == "to" and "cpu" in [str(a) for a in (*args[1:], *kwargs.values())]
        landed = bool(args) and self.async_copies.get(id(args[0])) is args[0]
        if self.inside and (name in SYNCS or to_host) and not landed:
            self.syncs.append(f"{name} at {traceback.extract_stack(limit=2)[0].line}")
        return out


class Watched:
    """A training loader whose passes are watched: from the first batch to the loader's end (the
    loop's last step included), i.e. the whole epoch's loop; evaluation and the epoch's end are not."""

    def __init__(self, loader, watch: SyncWatch) -> None:
        self.loader, self.watch = loader, watch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.watch.inside = True
        yield from self.loader
        self.watch.inside = False


def test_an_epoch_of_resnet2_never_syncs_host_and_device(vision_cfg, tmp_path):  # noqa: F811
    """The GPU path's bookkeeping, on the CPU: bf16 autocast, channels_last, augmentation on the
    device, train_loss logged at every step, and not one read-back inside the epoch's loop (the
    GPU check runs the same epoch under torch.cuda.set_sync_debug_mode("error"))."""
    cfg = vision_cfg("model=resnet2", "model.layers=[4,8]", "trainer.precision=bf16", "trainer.channels_last=on",
                     "trainer.log_every=1", "trainer.epochs=1", "trainer.checkpoints=false", tracking=False)
    data = build_data(cfg, "cpu")
    model = instantiate(cfg.model, **data.model_args())
    recorder, watch = Recorder(), SyncWatch()
    data.train = Watched(data.train, watch)
    with watch:
        watch.inside = True
        torch.ones(()).item()  # the watch sees a read-back...
        assert watch.syncs == ["item at torch.ones(()).item()  # the watch sees a read-back..."]
        watch.inside, watch.syncs = False, []
        runner.fit(cfg, model, data, build_optimizer(cfg.optim, model), Schedule(cfg.schedule.phases, 1),
                   recorder, tmp_path)
    assert watch.syncs == []  # ...and none in the epoch's loop
    assert [s for s, _ in recorder.metrics["train_loss"]] == list(range(1, 10))  # every step, read back after


@pytest.mark.parametrize("preset", ["experiment=lesson6_lstm_fast", "experiment=lesson7_resnet2_fast",
                                    "sweep=lstm_fast_search", "sweep=resnet2_fast_search"])
def test_fast_presets_compose_and_validate(preset: str):
    """The GPU recipes and their searches compose into valid configs (benchmarks/gpu_check.sh
    --rehearse trains them on the CPU: they run and improve on their first epoch)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[preset])
        hydra = compose("train", overrides=[preset], return_hydra_config=True).hydra
    if preset.startswith("sweep"):
        assert hydra.sweeper.n_jobs == hydra.launcher.n_jobs > 1  # several trials on one GPU
        assert hydra.sweeper.pruner == "median" and hydra.sweeper.params
    validate(cfg)
    assert cfg.trainer.compile != "off" and cfg.schedule.phases[0].kind == "onecycle"
    assert cfg.model.cell == "loop" if cfg.data.bs == 256 else cfg.model.running_stats  # LSTM: padded buckets
