from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lesson7_sweeps.data.text import UNK, BpttLoader, TextData, Vocab, batchify, cached_copy, read_splits
from lesson7_sweeps.errors import DataError

from .conftest import make_text


def text_data(path: Path, **kw) -> TextData:
    args = dict(path=str(path), url=None, cache_dir=str(path.parent / "cache"), lower=True, min_freq=1,
                valid_frac=0.2, valid_from_line=None, bs=4, bptt=8, random_bptt=True, loader="plain", vocab="sorted",
                val_average="samples", max_bytes=2**20,
                seed=0)
    return TextData(**{**args, **kw})


def test_batchify_lays_text_into_contiguous_columns():
    ids = torch.arange(26)
    cols = batchify(ids, 4)
    assert cols.shape == (6, 4)  # 26 // 4 rows; the 2-token tail is dropped
    for j in range(4):  # column j is the j-th contiguous stretch of the text
        assert cols[:, j].tolist() == list(range(6 * j, 6 * j + 6))


def test_sections_are_x_and_x_shifted_by_one():
    data = batchify(torch.arange(400), 4)
    loader = BpttLoader(data, bptt=7, random_lengths=False)
    row = 0
    for x, y in loader:
        assert y.tolist() == data[row + 1 : row + 1 + x.size(0)].reshape(-1).tolist()
        assert torch.equal(x, data[row : row + x.size(0)])
        row += x.size(0)
    assert row == data.size(0) - 1  # every row but the last is an input once
    assert len(loader) == len(list(loader))  # fixed lengths: __len__ is exact


def test_random_bptt_follows_the_lessons_rule():
    loader = BpttLoader(torch.zeros(10, 1), bptt=70, random_lengths=True, rng=np.random.default_rng(0))
    lengths = np.array([loader.next_length() for _ in range(20000)])
    assert lengths.min() >= 5
    half = lengths < 52  # bptt/2 = 35 +- 5 sigma never reaches the 70-centred mode below 52
    assert 0.04 < half.mean() < 0.06  # "bptt/2 with probability 0.05"
    assert abs(lengths[~half].mean() - 69.5) < 0.3  # int() truncates normal(70, 5): mean ~ 69.5
    assert abs(lengths[~half].std() - 5) < 0.2


def test_random_bptt_has_a_minimum_of_5():
    loader = BpttLoader(torch.zeros(10, 1), bptt=2, random_lengths=True, rng=np.random.default_rng(1))
    assert min(loader.next_length() for _ in range(2000)) == 5


def test_same_seed_same_sections_and_epochs_differ():
    data = batchify(torch.arange(4000), 4)

    def lengths(seed: int, epochs: int = 2) -> list[list[int]]:
        loader = BpttLoader(data, 8, True, np.random.default_rng(seed))
        return [[x.size(0) for x, _ in loader] for _ in range(epochs)]

    assert lengths(3) == lengths(3)
    assert lengths(3) != lengths(4)
    first, second = lengths(3)
    assert first != second


def test_vocab_min_freq_maps_rare_characters_to_unknown():
    vocab = Vocab.build("aaabbbc", min_freq=2, order="sorted")
    assert vocab.itos == [UNK, "a", "b"]
    assert vocab.encode("abcz").tolist() == [1, 2, 0, 0]
    assert Vocab.from_json(vocab.to_json()).itos == vocab.itos


def test_text_data_file_split_lowercase_and_device(tmp_path: Path):
    path = tmp_path / "t.txt"
    text = make_text(3000).replace("the", "The")
    path.write_text(text, encoding="utf-8")
    data = text_data(path)
    assert "T" not in data.vocab.itos
    assert (data.n_train, data.n_valid) == (2400, 600)
    assert data.kind == "text" and data.model_args() == {"vocab_size": len(data.vocab)}
    x, y = next(iter(data.valid))
    assert x.shape == (8, 4) and y.shape == (32,)
    assert data.vocab.decode(x[:, 0]) == text.lower()[2400:2408]


def test_folder_layout_train_and_valid(tmp_path: Path):
    for split, seed in (("trn", 1), ("valid", 2)):  # the lesson's trn/ and the valid/ both work
        (tmp_path / split).mkdir()
        (tmp_path / split / "a.txt").write_text(make_text(500, seed), encoding="utf-8")
        (tmp_path / split / "b.txt").write_text(make_text(500, seed + 10), encoding="utf-8")
    train, valid = read_splits(tmp_path, 0.2, None, 2**20)
    assert train == make_text(500, 1) + make_text(500, 11)
    assert valid == make_text(500, 2) + make_text(500, 12)


def assert_one_line(err: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    for f in fragments:
        assert f in msg, msg


def test_missing_file_without_url_names_data_path(tmp_path: Path):
    with pytest.raises(DataError) as err:
        text_data(tmp_path / "nope.txt")
    assert_one_line(err, "data.path=", "nope.txt", "does not exist")


def test_missing_file_offline_download_fails_in_one_line(tmp_path: Path):
    with pytest.raises(DataError) as err:  # a port nothing listens on: the download cannot succeed
        text_data(tmp_path / "nope.txt", url="http://127.0.0.1:9/nietzsche.txt")
    assert_one_line(err, "data.path=", "could not be downloaded", "local copy")
    assert not (tmp_path / "cache" / "nietzsche.txt").exists()


def test_cached_download_is_used_when_path_is_missing(tmp_path: Path):
    cache = tmp_path / "cache"
    cache.mkdir()
    url = "http://127.0.0.1:9/corpus.txt"
    cached_copy(url, cache).write_text(make_text(2000), encoding="utf-8")  # as a past download left it
    data = text_data(tmp_path / "nope.txt", url=url)
    assert data.path == cached_copy(url, cache) and data.path.parent == cache and data.path.suffix == ".txt"


@pytest.mark.parametrize(("content", "fragment"), [(b"", "is empty"), (b"caf\xe9 " * 200, "not UTF-8")])
def test_unreadable_text_is_one_line(tmp_path: Path, content: bytes, fragment: str):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        text_data(path)
    assert_one_line(err, fragment, str(path))


def test_text_too_short_for_bs_and_bptt(tmp_path: Path):
    path = tmp_path / "short.txt"
    path.write_text(make_text(300), encoding="utf-8")
    with pytest.raises(DataError) as err:
        text_data(path, bs=16, bptt=8)
    assert_one_line(err, "data.bs * (data.bptt + 1) = 144", "lower data.bs")
