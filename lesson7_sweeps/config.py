"""Structured-config schemas: the type of every key, and the checks on its value.

The values themselves (every default) live once, in conf/*.yaml; each YAML option starts from one of
these schemas (`defaults: [text_schema, _self_]`), so Hydra rejects an unknown key or a wrong type
while composing, and `validate()` rejects an impossible value (lr <= 0, bptt < 1, ...) before any
data is read or any MLflow run exists.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lesson7_sweeps.errors import ConfigError

# torch.compile's modes, or eager; defined here, not in fast.py, so that reading a config imports no torch
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compile_mode(setting: str) -> str:
    """The mode a trainer.compile setting names; "True"/"False" are what OmegaConf makes of the
    booleans earlier versions took (true = torch.compile's default mode)."""
    return {"True": "default", "False": "off"}.get(setting, setting)


CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
# what `objective` may name, and which way a sweep optimises it; a list of them is a multi-objective
# sweep (a Pareto front), e.g. quality vs speed: [val_loss, train_time]
OBJECTIVES = {"val_loss": "minimize", "val_bpc": "minimize", "val_accuracy": "maximize", "val_accuracy_tta": "maximize",
              "train_time": "minimize", "throughput": "maximize"}
TTA_MODES = ("lesson", "views", "none")
VAL_AVERAGES = ("samples", "batches")  # how val_loss / val_accuracy weigh the validation batches
# what each kind of data reports (val_accuracy_tta unless data.tta=none)
DATA_METRICS = {"text": ("val_loss", "val_bpc", "val_accuracy", "train_time", "throughput"),
                "image": ("val_loss", "val_accuracy", "val_accuracy_tta", "train_time", "throughput")}
SEED_RANGE = 2**32  # numpy's seeds are 32-bit


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: {allowed}")


def _number_or_none(key: str, value: Any) -> None:
    """A field typed Any because OmegaConf has no Union: a number, or null; never a node."""
    ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))
    _check(ok, key, value, "use a number, or null")


def _per_group(key: str, value: Any, positive: bool) -> None:
    """lr / weight_decay: one number for every layer group, or a list with one per group."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = len(values) > 0 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ok = ok and all((v > 0 if positive else v >= 0) and math.isfinite(v) for v in values)
    bound = "> 0" if positive else ">= 0"
    _check(ok, key, value, f"use a number {bound} or a list of such numbers, one per layer group")


# --- data --------------------------------------------------------------------------------------


@dataclass
class TextDataConfig:
    _target_: str = MISSING
    path: str = MISSING  # a text file (split by valid_frac) or a folder with train/ and valid/
    url: str | None = MISSING  # public copy downloaded when path is missing; null = never download
    cache_dir: str = MISSING
    lower: bool = MISSING
    min_freq: int = MISSING
    valid_frac: float = MISSING
    valid_from_line: Any = MISSING  # N: validation = line N (1-based) onwards, not the valid_frac cut
    bs: int = MISSING
    bptt: int = MISSING
    random_bptt: bool = MISSING
    loader: str = MISSING  # plain | lesson (fastai 0.7's LanguageModelLoader for training and validation)
    vocab: str = MISSING  # sorted | lesson (torchtext's: <unk>, <pad>, then by frequency)
    val_average: str = MISSING  # samples | batches
    eval_limit: int | None = MISSING  # the runner's: evaluate on the first N validation batches; null = all
    max_bytes: int = MISSING  # the most bytes of text read; anything but regular files is refused

    def __post_init__(self) -> None:
        _check(self.bs >= 1, "data.bs", self.bs, "the batch size must be >= 1")
        _check(self.max_bytes >= 1, "data.max_bytes", self.max_bytes, "must be >= 1 byte")
        _check(self.bptt >= 1, "data.bptt", self.bptt, "the BPTT length must be >= 1")
        _check(self.min_freq >= 1, "data.min_freq", self.min_freq, "must be >= 1")
        _check(0 < self.valid_frac < 1, "data.valid_frac", self.valid_frac, "must be in (0, 1)")
        _check(self.valid_from_line is None or (isinstance(self.valid_from_line, int) and self.valid_from_line >= 2),
               "data.valid_from_line", self.valid_from_line, "use a line number >= 2, or null to cut at valid_frac")
        _check(self.url is None or self.url.startswith(("https://", "http://")), "data.url", self.url,
               "use an http(s):// address, or null for no download")
        _check(self.loader in ("plain", "lesson"), "data.loader", self.loader, "use plain or lesson")
        _check(self.vocab in ("sorted", "lesson"), "data.vocab", self.vocab, "use sorted or lesson")
        _check(self.val_average in VAL_AVERAGES, "data.val_average", self.val_average,
               f"use one of {'|'.join(VAL_AVERAGES)}")
        _check_eval_limit(self.eval_limit)


@dataclass
class CifarDataConfig:
    _target_: str = MISSING
    root: str = MISSING  # torchvision's cifar-10-batches-py, a train/ + test/ class-folder layout, or a .tar.gz of it
    cache_dir: str | None = MISSING  # null = beside the source (or ~/.cache/lesson7_sweeps when read-only)
    download: bool = MISSING
    bs: int = MISSING
    stats: str = MISSING
    pad: int = MISSING
    crop: bool = MISSING
    flip: bool = MISSING
    tta: str = MISSING
    pad_mode: str = MISSING  # reflect | symmetric (the edge pixel repeated: OpenCV's BORDER_REFLECT)
    crop_offsets: str = MISSING  # all (0..2*pad) | lesson (fastai 0.7: 0..2*pad-1, after the flip)
    drop_last: bool = MISSING  # train without the last partial batch
    val_average: str = MISSING  # samples | batches
    eval_limit: int | None = MISSING  # the runner's: evaluate (and TTA) on the first N validation batches
    max_bytes: int = MISSING  # the most bytes read: source files, an archive's images, the decoded cache

    def __post_init__(self) -> None:
        _check(self.bs >= 1, "data.bs", self.bs, "the batch size must be >= 1")
        _check(self.max_bytes >= 1, "data.max_bytes", self.max_bytes, "must be >= 1 byte")
        _check(self.tta in TTA_MODES, "data.tta", self.tta, f"use one of {'|'.join(TTA_MODES)}")
        _check(self.stats in ("lesson", "compute"), "data.stats", self.stats, "use lesson or compute")
        _check(self.pad >= 0, "data.pad", self.pad, "must be >= 0 pixels")
        _check(self.crop or self.pad == 0, "data.pad", self.pad, "padding only feeds the crop: set data.crop=true")
        _check(self.pad < 32, "data.pad", self.pad, "pad by fewer pixels than the 32-pixel image")
        _check(self.pad_mode in ("reflect", "symmetric"), "data.pad_mode", self.pad_mode, "use reflect or symmetric")
        _check(self.crop_offsets in ("all", "lesson"), "data.crop_offsets", self.crop_offsets, "use all or lesson")
        _check(self.val_average in VAL_AVERAGES, "data.val_average", self.val_average,
               f"use one of {'|'.join(VAL_AVERAGES)}")
        _check_eval_limit(self.eval_limit)


def _check_eval_limit(limit: int | None) -> None:
    _check(limit is None or limit >= 1, "data.eval_limit", limit, "use a number of batches >= 1, or null for all")


# --- models ------------------------------------------------------------------------------------


@dataclass
class RNNModelConfig:
    _target_: str = MISSING
    kind: str = MISSING
    n_fac: int = MISSING
    n_hidden: int = MISSING
    n_layers: int = MISSING
    dropout: float = MISSING
    cell: str = MISSING
    stateful: bool = MISSING
    reset_hidden: bool = MISSING  # fresh state at each epoch and evaluation; false: it carries on (the lesson)

    def __post_init__(self) -> None:
        _check(self.kind in ("rnn", "gru", "lstm"), "model.kind", self.kind, "use rnn, gru or lstm")
        _check(self.cell in ("cudnn", "loop"), "model.cell", self.cell, "use cudnn or loop")
        _check(self.n_fac >= 1, "model.n_fac", self.n_fac, "must be >= 1")
        _check(self.n_hidden >= 1, "model.n_hidden", self.n_hidden, "must be >= 1")
        _check(self.n_layers >= 1, "model.n_layers", self.n_layers, "must be >= 1")
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class WidthsConfig:
    """SimpleNet, ConvNet, ConvNet2: hidden widths only (input and class count are added)."""

    _target_: str = MISSING
    layers: list[int] = MISSING

    def __post_init__(self) -> None:
        _check(len(self.layers) > 0 and all(w >= 1 for w in self.layers), "model.layers", self.layers,
               "give at least one width, each >= 1")


@dataclass
class BnNetConfig(WidthsConfig):
    """ConvBnNet, ConvBnNet2, Resnet: BnLayer stages."""

    bn: str = MISSING  # scratch = the lesson's BatchNorm; torch = nn.BatchNorm2d
    running_stats: bool = MISSING  # eval with EWMA statistics; false = the last training batch's (lesson)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.bn in ("scratch", "torch"), "model.bn", self.bn, "use scratch or torch")


@dataclass
class Resnet2Config(BnNetConfig):
    dropout: float = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.dropout < 1, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass
class BlocksConfig(Resnet2Config):
    """ResnetFull, PreactResnet: `blocks` residual blocks per width step."""

    blocks: int = MISSING

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.blocks >= 1, "model.blocks", self.blocks, "must be >= 1")


# --- optimiser and schedule --------------------------------------------------------------------


@dataclass
class AdamConfig:
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: Any = MISSING  # one value, or a list with one per layer group
    weight_decay: Any = MISSING  # likewise
    betas: list[float] = MISSING
    eps: float = MISSING

    def __post_init__(self) -> None:
        _per_group("optim.lr", self.lr, positive=True)
        _per_group("optim.weight_decay", self.weight_decay, positive=False)
        _check(all(0 <= b < 1 for b in self.betas) and len(self.betas) == 2, "optim.betas", self.betas,
               "use two numbers in [0, 1)")


@dataclass
class SGDConfig:
    _target_: str = MISSING
    _partial_: bool = MISSING
    lr: Any = MISSING
    weight_decay: Any = MISSING
    momentum: float = MISSING
    nesterov: bool = MISSING

    def __post_init__(self) -> None:
        _per_group("optim.lr", self.lr, positive=True)
        _per_group("optim.weight_decay", self.weight_decay, positive=False)
        _check(0 <= self.momentum < 1, "optim.momentum", self.momentum, "must be in [0, 1)")


PHASE_KINDS = {"constant": (), "sgdr": ("cycle_len", "cycle_mult", "warmup_frac", "warmup"),
               "onecycle": ("pct_start", "div", "final_div")}


@dataclass
class PhaseConfig:
    """One `fit` call of the notebook: a schedule kind over some epochs at lr * lr_mult."""

    kind: str = MISSING
    epochs: Any = MISSING  # number of epochs, or null for "until training ends" (last phase only)
    lr_mult: float = MISSING
    reset_optimizer: bool = MISSING  # a fresh optimizer state here, as each fastai learn.fit builds one
    # only for kind=sgdr
    cycle_len: Any = None
    cycle_mult: Any = None
    warmup_frac: Any = None
    warmup: str | None = None  # phase = the lesson's (start of the phase only) | cycle = every cycle
    # only for kind=onecycle
    pct_start: Any = None
    div: Any = None
    final_div: Any = None

    def __post_init__(self) -> None:
        for name in ("epochs", *(n for names in PHASE_KINDS.values() for n in names if n != "warmup")):
            _number_or_none(f"schedule.phases.{name}", getattr(self, name))
        _check(self.kind in PHASE_KINDS, "schedule.phases.kind", self.kind, f"use one of {list(PHASE_KINDS)}")
        _check(self.epochs is None or self.epochs > 0, "schedule.phases.epochs", self.epochs,
               "use a number of epochs > 0, or null for the rest of training")
        _check(self.lr_mult > 0, "schedule.phases.lr_mult", self.lr_mult, "must be > 0")
        for name in PHASE_KINDS[self.kind]:
            _check(getattr(self, name) is not None, f"schedule.phases.{name}", None,
                   f"a {self.kind} phase needs {', '.join(PHASE_KINDS[self.kind])}")
        if self.kind == "sgdr":
            _check(self.cycle_len > 0, "schedule.phases.cycle_len", self.cycle_len, "must be > 0 epochs")
            _check(self.cycle_mult >= 1, "schedule.phases.cycle_mult", self.cycle_mult, "must be >= 1")
            _check(0 <= self.warmup_frac < 1, "schedule.phases.warmup_frac", self.warmup_frac, "in [0, 1)")
            _check(self.warmup in ("phase", "cycle"), "schedule.phases.warmup", self.warmup, "use phase or cycle")
        if self.kind == "onecycle":
            _check(0 < self.pct_start < 1, "schedule.phases.pct_start", self.pct_start, "must be in (0, 1)")
            _check(self.div >= 1 and self.final_div >= 1, "schedule.phases.div", self.div, "div and final_div >= 1")


@dataclass
class ScheduleConfig:
    phases: list[PhaseConfig] = MISSING

    def __post_init__(self) -> None:
        _check(len(self.phases) > 0, "schedule.phases", [], "give at least one phase")
        for phase in self.phases[:-1]:
            _check(phase.epochs is not None, "schedule.phases.epochs", None,
                   "only the last phase may run until training ends (epochs: null)")


# --- trainer and tracking ----------------------------------------------------------------------


@dataclass
class SampleConfig:
    chars: int = MISSING  # characters generated at the end of training (0 = none)
    prompt: str = MISSING
    temperature: float = MISSING  # 0 = greedy


@dataclass
class LRFinderConfig:
    start_lr: float = MISSING
    end_lr: float = MISSING
    num_steps: int = MISSING
    stop_factor: float = MISSING  # stop once the smoothed loss exceeds stop_factor * best loss


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    max_steps: int | None = MISSING  # cap on optimizer steps (smoke runs); null = no cap
    device: str = MISSING
    threads: str = MISSING  # auto or a number >= 1
    deterministic: bool = MISSING
    clip_grad_norm: float | None = MISSING  # max global grad norm; null = no clipping
    label_smoothing: float = MISSING
    precision: str = MISSING
    channels_last: str = MISSING
    compile: str = MISSING  # off or a torch.compile mode; true/false of older configs read "True"/"False"
    bptt_bucket: int = MISSING
    cuda_graph: bool = MISSING
    eval_every: int | None = MISSING  # steps between evaluations inside an epoch; null = epoch ends only
    log_every: int = MISSING
    progress: str = MISSING
    checkpoints: bool = MISSING
    keep_cycle_checkpoints: bool = MISSING
    sample: SampleConfig = MISSING
    lr_finder: LRFinderConfig = MISSING

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        _check(self.max_steps is None or self.max_steps >= 1,
               "trainer.max_steps", self.max_steps, "use an integer >= 1, or null for no cap")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "trainer.device",
               self.device, "use auto, cpu, cuda or cuda:N")
        _check(self.threads == "auto" or (self.threads.isdigit() and int(self.threads) >= 1), "trainer.threads",
               self.threads, "use auto or a number of threads >= 1")
        _check(self.clip_grad_norm is None or self.clip_grad_norm > 0, "trainer.clip_grad_norm",
               self.clip_grad_norm, "use a number > 0, or null for no clipping")
        _check(0 <= self.label_smoothing < 1, "trainer.label_smoothing", self.label_smoothing, "must be in [0, 1)")
        _check(self.precision in ("auto", "fp32", "bf16"), "trainer.precision", self.precision,
               "use auto, fp32 or bf16")
        _check(self.channels_last in ("auto", "on", "off"), "trainer.channels_last", self.channels_last,
               "use auto, on or off")
        _check(compile_mode(self.compile) in COMPILE_MODES, "trainer.compile", self.compile,
               f"use one of {'|'.join(COMPILE_MODES)}")
        _check(not self.cuda_graph or compile_mode(self.compile) == "off", "trainer.cuda_graph", self.cuda_graph,
               "needs trainer.compile=off (torch.compile's reduce-overhead mode captures CUDA graphs itself)")
        _check(self.bptt_bucket >= 1, "trainer.bptt_bucket", self.bptt_bucket, "must be >= 1 step")
        _check(self.log_every >= 1, "trainer.log_every", self.log_every, "must be >= 1")
        _check(self.eval_every is None or self.eval_every >= 1, "trainer.eval_every", self.eval_every,
               "use a number of steps >= 1, or null to evaluate at epoch ends only")
        _check(self.progress in ("auto", "on", "off"), "trainer.progress", self.progress, "use auto, on or off")
        _check(self.sample.chars >= 0, "trainer.sample.chars", self.sample.chars, "must be >= 0")
        # below ~1e-37 the scaled log-probabilities overflow to inf; long before that sampling is greedy
        _check(self.sample.temperature == 0 or self.sample.temperature >= 1e-3, "trainer.sample.temperature",
               self.sample.temperature, "use 0 (greedy) or a temperature >= 0.001")
        f = self.lr_finder
        _check(0 < f.start_lr < f.end_lr, "trainer.lr_finder.start_lr", f.start_lr, "need 0 < start_lr < end_lr")
        _check(f.num_steps >= 2, "trainer.lr_finder.num_steps", f.num_steps, "must be >= 2")


@dataclass
class MlflowTrackingConfig:
    _target_: str = MISSING
    uri: str = MISSING
    experiment: str = MISSING
    artifact_location: str | None = MISSING  # null = beside a sqlite store's file; a server decides its own
    run_name: str | None = MISSING  # null = derived from the model and its key hyper-parameters
    log_model: bool = MISSING
    system_metrics: bool = MISSING
    heartbeat_s: float = MISSING
    stale_after_s: float = MISSING

    def __post_init__(self) -> None:
        _check(bool(self.experiment), "tracking.experiment", self.experiment, "give a non-empty name")
        _check(self.heartbeat_s > 0, "tracking.heartbeat_s", self.heartbeat_s, "must be > 0 seconds")
        _check(self.stale_after_s > self.heartbeat_s, "tracking.stale_after_s", self.stale_after_s,
               "must exceed tracking.heartbeat_s, or a live run would look stale")


@dataclass
class NoTrackingConfig:
    _target_: str = MISSING


SCHEMAS = {
    "data": {"text_schema": TextDataConfig, "cifar_schema": CifarDataConfig},
    "model": {"rnn_schema": RNNModelConfig, "widths_schema": WidthsConfig, "bnnet_schema": BnNetConfig,
              "resnet2_schema": Resnet2Config, "blocks_schema": BlocksConfig},
    "optim": {"adam_schema": AdamConfig, "sgd_schema": SGDConfig},
    "schedule": {"schedule_schema": ScheduleConfig},
    "trainer": {"trainer_schema": TrainerConfig},
    "tracking": {"mlflow_schema": MlflowTrackingConfig, "none_schema": NoTrackingConfig},
}


def register_schemas() -> None:
    """The schemas for conf/ options to start from (`- /schema/optim/adam_schema@_here_`), and the
    `abspath` resolver conf/ uses. Stored apart from the groups they type: in `optim/` they would be
    options of the group, which `optim=glob(*)` would launch as trials."""
    cs = ConfigStore.instance()
    for group, nodes in SCHEMAS.items():
        for name, node in nodes.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
    OmegaConf.register_new_resolver("abspath", lambda p: os.path.abspath(os.path.expanduser(p)), replace=True)


def _unknown_keys(node: DictConfig, prefix: str) -> list[str]:
    """Keys under a schema'd node that its schema lacks: `+trainer.epoch=5` adds one past Hydra's
    struct check, and `OmegaConf.to_object` would drop it without a word."""
    schema = OmegaConf.get_type(node)
    if not is_dataclass(schema):
        return []
    known = {f.name for f in fields(schema)}
    out = []
    for k in node:
        key, child = f"{prefix}.{k}", node._get_node(k)
        if k not in known:
            close = difflib.get_close_matches(str(k), known, n=1)
            out.append(f"{key}: no such setting" + (f" (did you mean {prefix}.{close[0]}?)" if close else ""))
        elif isinstance(child, DictConfig):
            out += _unknown_keys(child, key)
        elif OmegaConf.is_list(child):
            out += [u for i, item in enumerate(child) if isinstance(item, DictConfig)
                    for u in _unknown_keys(item, f"{key}[{i}]")]
    return out


def objective_names(objective: Any) -> list[str]:
    """The metric names `objective` gives: one name, or a list of them (several objectives)."""
    return [objective] if isinstance(objective, str) else [str(o) for o in objective]


def is_multi_objective(objective: Any) -> bool:
    return not isinstance(objective, str)


def check_objective(objective: Any) -> None:
    """One name of OBJECTIVES, or a list of two or more different ones."""
    allowed = f"use one of {', '.join(OBJECTIVES)}"
    if isinstance(objective, str):
        _check(objective in OBJECTIVES, "objective", objective, allowed)
        return
    several = f"{allowed}, or a list of several: objective=[val_loss,train_time]"
    _check(OmegaConf.is_list(objective) or isinstance(objective, (list, tuple)), "objective", objective, several)
    names = objective_names(objective)
    shown = f"[{','.join(names)}]"
    unknown = [n for n in names if n not in OBJECTIVES]
    _check(not unknown, "objective", shown, f"{unknown[0] if unknown else ''} is not an objective; {several}")
    _check(len(set(names)) == len(names), "objective", shown, "name each objective once")
    _check(len(names) >= 2, "objective", shown, "a list names two or more objectives (a Pareto front); "
           f"for one, write objective={names[0] if names else 'val_loss'}")


def data_kind(cfg: DictConfig) -> str:
    """'text' or 'image': which models and metrics fit the chosen data."""
    return "text" if OmegaConf.get_type(cfg.data) is TextDataConfig else "image"


def validate(cfg: DictConfig) -> None:
    """Check every value; raise ConfigError with one line that names the key and what is allowed."""
    _check(isinstance(cfg.seed, int) and 0 <= cfg.seed < SEED_RANGE, "seed", cfg.seed,
           "use an integer in [0, 2**32) (numpy's seed range)")
    _check(cfg.resume is None or isinstance(cfg.resume, str), "resume", cfg.resume, "give an MLflow run id")
    _check(isinstance(cfg.force_resume, bool), "force_resume", cfg.force_resume, "use true or false")
    check_objective(cfg.objective)
    for group in SCHEMAS:
        unknown = _unknown_keys(cfg[group], group)
        if unknown:
            raise ConfigError(f"{unknown[0]}; '+' cannot add keys to the {group} group, only set its existing ones")
        try:
            OmegaConf.to_object(cfg[group])  # builds the dataclasses, which runs their __post_init__
        except OmegaConfBaseException as e:
            msg = str(e).splitlines()[0]
            key = getattr(e, "full_key", None) or ""
            if not key.startswith(f"{group}."):  # OmegaConf gives it from the root, or from the group
                key = f"{group}.{key}" if key else group
            raise ConfigError(f"{key}: {msg}") from None
    kind = data_kind(cfg)
    rnn = OmegaConf.get_type(cfg.model) is RNNModelConfig
    if rnn != (kind == "text"):
        fits = "model=rnn, gru or lstm" if kind == "text" else "an image model (model=simplenet, ..., resnet2)"
        raise ConfigError(f"model._target_={cfg.model._target_} is {'a text' if rnn else 'an image'} model but "
                          f"data._target_={cfg.data._target_} is {kind} data; pick {fits} for this data")
    sample = cfg.trainer.sample
    _check(kind != "text" or sample.chars == 0 or sample.prompt != "", "trainer.sample.prompt", sample.prompt,
           "a sample continues a prompt: give one of at least one character, or trainer.sample.chars=0")
    metrics = [m for m in DATA_METRICS[kind] if m != "val_accuracy_tta" or cfg.data.tta != "none"]
    for name in objective_names(cfg.objective):
        _check(name in metrics, "objective", name,
               f"{kind} data{' with data.tta=none' if kind == 'image' else ''} reports only {', '.join(metrics)}")
