"""Character-level text: the vocabulary, the column layout (batchify) and the BPTT section loader.

Public copy of the lesson's corpus: https://s3.amazonaws.com/text-datasets/nietzsche.txt
(`data=nietzsche` downloads it into `data.cache_dir` once when `data.path` is missing).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lesson7_sweeps.data.files import data_files, read_bytes
from lesson7_sweeps.errors import DataError

log = logging.getLogger(__name__)
UNK = "<unk>"
PAD = "<pad>"  # the lesson's vocabulary has it (torchtext's Field), though no character maps to it
MIN_TOKENS = 2  # characters (besides <unk>, <pad>): fewer, and every prediction is trivially right
UNK_WARN_FRAC = 0.05  # warn (and tag the run) when more of the text than this is <unk>
TRAIN_DIRS = ("train", "trn")  # the lesson's layout used trn/ and val/
VALID_DIRS = ("valid", "val")


class Vocab:
    """One token per character; index 0 is the unknown token (rare or unseen characters).

    order: sorted = <unk>, then the characters in code-point order; lesson = torchtext's Vocab, as
    fastai 0.7 built it: <unk>, <pad>, then the characters by falling frequency, ties in code-point order.
    """

    def __init__(self, itos: list[str]) -> None:
        self.itos = list(itos)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @classmethod
    def build(cls, text: str, min_freq: int, order: str) -> Vocab:
        counts = Counter(text)
        kept = [c for c, n in counts.items() if n >= min_freq]
        if order == "lesson":
            return cls([UNK, PAD] + sorted(kept, key=lambda c: (-counts[c], c)))
        return cls([UNK] + sorted(kept))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor([self.stoi.get(c, 0) for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.itos[i] for i in torch.as_tensor(ids).tolist())

    def to_json(self) -> str:
        return json.dumps({"itos": self.itos}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s: str) -> Vocab:
        return cls(json.loads(s)["itos"])


def batchify(ids: torch.Tensor, bs: int) -> torch.Tensor:
    """Lay a 1-D token stream into `bs` columns, each a contiguous stretch of the text.

    The tail that does not fill a whole row is dropped. For 24 tokens and bs=4:

        text   a b c d e f | g h i j k l | m n o p q r | s t u v w x
                  col 0         col 1         col 2         col 3

                 col0 col1 col2 col3
        row 0     a    g    m    s    } a BPTT section is a block of consecutive rows:
        row 1     b    h    n    t    } x = rows i..i+L-1, targets = rows i+1..i+L
        ...                           (each column shifted by one character)
        row 5     f    l    r    x

    Column j of one section continues column j of the previous one, which is why the model can
    carry its hidden state from batch to batch.
    """
    n_rows = ids.numel() // bs
    return ids[: n_rows * bs].view(bs, n_rows).t().contiguous()


class BpttLoader:
    """Yields (x [seq_len, bs], targets [seq_len * bs]) sections of a batchified text, in order.

    With `random_lengths`, each section length follows the lesson's rule: `bptt` with probability
    0.95, else `bptt / 2`, then `max(5, int(normal(that, 5)))`, drawn from `rng` (so the same seed
    gives the same sequence of lengths, and successive epochs differ). `max_sections`: a pass ends
    after that many sections even before the text does (fastai 0.7: len(dl) = rows // bptt - 1).
    """

    def __init__(self, data: torch.Tensor, bptt: int, random_lengths: bool,
                 rng: np.random.Generator | None = None, max_sections: int | None = None) -> None:
        if random_lengths and rng is None:
            raise ValueError("random section lengths need a seeded rng")
        self.data, self.bptt, self.random_lengths, self.rng = data, bptt, random_lengths, rng
        self.max_sections = max_sections
        self._lengths: list[int] | None = None  # the coming epoch's, once len() has drawn them
        self._current: list[int] = []  # the epoch being iterated (for checkpoints)
        self._skip = 0  # sections to skip at the next epoch start (resuming mid-epoch)

    def next_length(self) -> int:
        if not self.random_lengths:
            return self.bptt
        mean = self.bptt if self.rng.random() < 0.95 else self.bptt / 2
        return max(5, int(self.rng.normal(mean, 5)))

    def _draw_lengths(self) -> list[int]:
        lengths, i, n = [], 0, self.data.size(0)
        while i < n - 1 and (self.max_sections is None or len(lengths) < self.max_sections):
            lengths.append(min(self.next_length(), n - 1 - i))
            i += lengths[-1]
        return lengths

    def __len__(self) -> int:
        """Sections in the coming epoch. Its lengths are drawn here, so the count is exact and the
        schedule can place every batch at its true position within the epoch."""
        if self._lengths is None:
            self._lengths = self._draw_lengths()
        return len(self._lengths)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        lengths = self._lengths if self._lengths is not None else self._draw_lengths()
        self._lengths, self._current, skip, self._skip = None, lengths, self._skip, 0
        i = sum(lengths[:skip])
        for seq_len in lengths[skip:]:
            yield self.data[i : i + seq_len], self.data[i + 1 : i + 1 + seq_len].reshape(-1)
            i += seq_len

    def state_dict(self) -> dict[str, Any]:
        """The rng (for later epochs) and the lengths of the epoch being iterated."""
        return {"rng": self.rng.bit_generator.state if self.rng else None, "lengths": list(self._current)}

    def load_state_dict(self, state: dict[str, Any], batch: int) -> None:
        """Continue as the checkpointed loader would: mid-epoch (batch > 0) with that epoch's lengths."""
        lengths = state["lengths"]
        if batch > 0 and not (isinstance(lengths, list) and all(isinstance(n, int) and n >= 1 for n in lengths)
                              and sum(lengths) <= self.data.size(0) - 1):
            raise ValueError("loader lengths are not section lengths of this text")
        if self.rng is not None:
            self.rng.bit_generator.state = state["rng"]
        self._lengths = lengths if batch > 0 else None
        self._skip = batch


def _read(path: Path, max_bytes: int) -> str:
    try:
        text = read_bytes(path, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. iconv -t utf-8") from None
    if not text:
        raise DataError(f"{path} is empty; point data.path at a text file with content")
    return text


def _read_folder(path: Path, names: tuple[str, ...], max_bytes: int) -> str:
    for name in names:
        if (path / name).is_dir():
            files = sorted(f for f in (path / name).rglob("*") if f.is_file() and not f.name.startswith("."))
            if not files:
                raise DataError(f"{path / name} holds no text files; add some or point data.path at a file")
            return "".join(_read(f, max_bytes) for f in files)
    raise DataError(f"data.path={path} is a folder without a {'/ or '.join(names)}/ subfolder; "
                    "use a text file or a folder with train/ and valid/")


def cached_copy(url: str, cache_dir: str | Path) -> Path:
    """Where the download of `url` is kept. The name is ours, not the URL's: a URL ending in e.g.
    `x.pth` must not plant a file that Python runs (site-packages/*.pth) in the folder cache_dir names."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", url.rsplit("/", 1)[-1].removesuffix(".txt"))[:64] or "text"
    return Path(cache_dir).expanduser() / f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:8]}.txt"


def check_source(path: str, url: str | None, cache_dir: str) -> None:
    """lesson7-train's pre-flight: the text is there (its public copy downloaded now, once, not by
    every trial of a sweep at the same time) and not empty; one line otherwise, before any trial."""
    p = resolve_path(path, url, cache_dir)
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(f"{p} is empty; point data.path at a text file with content")


def resolve_path(path: str, url: str | None, cache_dir: str) -> Path:
    """The local text: `path` if it exists, else the copy of `url` in `cache_dir` (downloaded once)."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    if url is None:
        raise DataError(f"data.path={path} does not exist; pass data.path=/path/to/text.txt")
    cached = cached_copy(url, cache_dir)
    if not cached.exists():
        from torchvision.datasets.utils import download_url  # torchvision's downloader, as for CIFAR

        try:
            download_url(url, str(cached.parent), cached.name)
        except Exception as e:  # offline, DNS, HTTP errors: all mean "no copy to be had"
            cached.unlink(missing_ok=True)
            raise DataError(f"data.path={path} does not exist and {url} could not be downloaded "
                            f"({type(e).__name__}); point data.path at a local copy") from None
    return cached


def read_splits(path: Path, valid_frac: float, valid_from_line: int | None, max_bytes: int) -> tuple[str, str]:
    """(train, valid) text: a folder's train/ and valid/ files, or one file cut at 1 - valid_frac of
    its characters, or before line `valid_from_line` (1-based; lines keep their newlines). Regular
    files of at most `max_bytes` in all, checked before reading (data/files.py)."""
    data_files(path, max_bytes, "data.path")
    if path.is_dir():
        if valid_from_line is not None:
            raise DataError(f"data.valid_from_line={valid_from_line} splits a single file, but data.path={path} "
                            "is a folder with its own train/ and valid/; set data.valid_from_line=null")
        return _read_folder(path, TRAIN_DIRS, max_bytes), _read_folder(path, VALID_DIRS, max_bytes)
    text = _read(path, max_bytes)
    if valid_from_line is None:
        cut = int(len(text) * (1 - valid_frac))
        return text[:cut], text[cut:]
    lines = text.split("\n")  # lines as an editor counts them (the lesson cut its trn/ by lines)
    if valid_from_line > len(lines):
        raise DataError(f"data.valid_from_line={valid_from_line} but {path} has {len(lines)} lines; "
                        "use a smaller line number or data.valid_from_line=null")
    cut = sum(len(line) + 1 for line in lines[: valid_from_line - 1])  # + 1: each line's newline
    return text[:cut], text[cut:]


def fingerprint(path: Path, max_bytes: int) -> str:
    """sha256 of the text file, or of a folder's files in order (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(read_bytes(f, max_bytes))
    return h.hexdigest()


class TextData:
    """The training and validation text, laid into `bs` columns once, on the training device."""

    kind = "text"

    def __init__(self, path: str, url: str | None, cache_dir: str, lower: bool, min_freq: int,
                 valid_frac: float, valid_from_line: int | None, bs: int, bptt: int, random_bptt: bool,
                 loader: str, vocab: str, val_average: str, max_bytes: int, device: str | torch.device = "cpu",
                 seed: int = 0) -> None:
        self.path, self.lower = resolve_path(path, url, cache_dir), lower
        train_text, valid_text = (self.prepare(t) for t in read_splits(self.path, valid_frac, valid_from_line,
                                                                          max_bytes))
        need = bs * (bptt + 1)
        for split, text in (("training", train_text), ("validation", valid_text)):
            if len(text) < need:
                raise DataError(f"the {split} text of {self.path} has {len(text)} characters but "
                                f"data.bs * (data.bptt + 1) = {need} are needed; lower data.bs or "
                                "data.bptt, or use a longer text")
        self.vocab = Vocab.build(train_text, min_freq, vocab)
        n_chars = sum(s not in (UNK, PAD) for s in self.vocab.itos)
        if n_chars < MIN_TOKENS:
            raise DataError(f"data.min_freq={min_freq} leaves {n_chars} characters of {self.path} in "
                            f"the vocabulary (the rest become {UNK}), so every prediction would be trivially right; "
                            f"lower data.min_freq")
        self.warnings: list[str] = []  # tagged on the run by train.py
        counts = Counter(train_text) + Counter(valid_text)
        self.unk_frac = sum(n for ch, n in counts.items() if ch not in self.vocab.stoi) / counts.total()
        if self.unk_frac > UNK_WARN_FRAC:
            self.warnings.append(f"{self.unk_frac:.0%} of the text is {UNK} (data.min_freq={min_freq}); "
                                 f"val_loss and val_accuracy then flatter the model: lower data.min_freq")
            log.warning(self.warnings[-1])
        self.fingerprint = fingerprint(self.path, max_bytes)
        self.n_train, self.n_valid, self.val_average = len(train_text), len(valid_text), val_average
        train_ids = batchify(self.vocab.encode(train_text), bs).to(device)
        valid_ids = batchify(self.vocab.encode(valid_text), bs).to(device)
        rng = np.random.default_rng(seed)
        if loader == "lesson":  # fastai 0.7: one loader rule, one np.random stream, for training and validation
            self.train, self.valid = (BpttLoader(ids, bptt, random_bptt, rng, max(1, ids.size(0) // bptt - 1))
                                      for ids in (train_ids, valid_ids))
        else:
            self.train = BpttLoader(train_ids, bptt, random_bptt, rng)
            self.valid = BpttLoader(valid_ids, bptt, random_lengths=False)

    def prepare(self, text: str) -> str:
        """What the vocabulary expects: lower-cased when data.lower (prompts go through this too)."""
        return text.lower() if self.lower else text

    def model_args(self) -> dict[str, int]:
        """What the model needs to know about the data: instantiate(cfg.model, **data.model_args())."""
        return {"vocab_size": len(self.vocab)}

    def describe(self) -> dict[str, object]:
        return {"source": str(self.path), "train_chars": self.n_train, "valid_chars": self.n_valid,
                "vocab_size": len(self.vocab), "unk_frac": round(self.unk_frac, 6)}
