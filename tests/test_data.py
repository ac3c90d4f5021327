"""Tests of maxjax.data: tokenizer, document sources and the resumable batch pipeline."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from maxjax.config import Config, load_config
from maxjax.data import (
    EOT_ID,
    GPT2_VOCAB,
    DataError,
    TokenBatches,
    decode,
    embedded_documents,
    encode,
    file_documents,
    gpt2_tokenizer,
    validation_batches,
    validation_score,
    window_permutation,
)
from maxjax.data import pipeline as pipeline_module
from maxjax.data import sources as sources_module


def make_config(length: int = 32, batch_size: int = 8, **training) -> Config:
    """The tiny config with another sequence shape and training fields."""
    cfg = load_config("tiny")
    sequence = dataclasses.replace(
        cfg.sequence,
        length=length,
        batch_size=batch_size,
        total_tokens_per_batch=length * batch_size,
    )
    return dataclasses.replace(
        cfg, sequence=sequence, training=dataclasses.replace(cfg.training, **training)
    )


def take(batches: TokenBatches, count: int) -> list[np.ndarray]:
    return list(itertools.islice(batches, count))


def assert_same_batches(first: list[np.ndarray], second: list[np.ndarray]) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


def synthetic_documents(count: int) -> list[str]:
    """Distinct documents of different lengths (about 20 to 100 tokens)."""
    return [
        f"Document {i}: " + " ".join(f"w{(i * 31 + j * 17) % 997}" for j in range(8 + (i * 7) % 40))
        for i in range(count)
    ]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in texts))
    return path


def expected_windows(texts: list[str], length: int) -> list[tuple[int, ...]]:
    """Windows of the documents' ids, each followed by EOT, concatenated and cut to `length`."""
    stream = [token for text in texts for token in [*encode(text), EOT_ID]]
    return [tuple(stream[i : i + length]) for i in range(0, len(stream) - length + 1, length)]


# Tokenizer


def test_tokenizer_known_ids_and_special_token():
    tokenizer = gpt2_tokenizer()
    assert tokenizer is gpt2_tokenizer()
    assert tokenizer.n_vocab == GPT2_VOCAB == 50257
    assert tokenizer.encode("Hello world<|endoftext|>", allowed_special="all") == [
        15496,
        995,
        50256,
    ]
    assert EOT_ID == 50256


def test_encode_treats_special_text_as_ordinary_and_round_trips():
    ids = encode("a<|endoftext|>b")
    assert EOT_ID not in ids
    assert decode(ids) == "a<|endoftext|>b"
    text = "Ünïcödé — naïve café, 日本語, emoji 🙂\n\ttabs  and  spaces  "
    assert decode(encode(text)) == text
    assert encode("Hello world") == [15496, 995]


# Sources


def test_embedded_documents_sorted_topics():
    from pydoc_data.topics import topics

    documents = list(embedded_documents())
    assert documents == [topics[key] for key in sorted(topics)]
    assert sum(len(d) for d in documents) > 100_000


def test_file_documents_all_formats(tmp_path):
    text_file = tmp_path / "a.txt"
    text_file.write_text("First line.\n\nSecond paragraph.\n")
    jsonl_file = write_jsonl(tmp_path / "b.jsonl", ["json one", "json two"])
    gz_file = tmp_path / "c4-train.00000-of-01024.json.gz"
    with gzip.open(gz_file, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz one", "timestamp": "t", "url": "u"}) + "\n\n")
        f.write(json.dumps({"text": "gz two"}) + "\n")
    documents = list(file_documents([text_file, jsonl_file, gz_file]))
    assert documents == [
        "First line.\n\nSecond paragraph.\n",
        "json one",
        "json two",
        "gz one",
        "gz two",
    ]
    assert list(file_documents([str(tmp_path / "*.jsonl")])) == ["json one", "json two"]


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match="nope.jsonl.*does not exist"):
        file_documents([missing])
    with pytest.raises(DataError, match="matches no file"):
        file_documents([str(tmp_path / "*.json.gz")])


def test_bad_json_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(
        DataError, match=r'bad\.jsonl, line 2: expected a JSON object with a "text"'
    ):
        list(file_documents([path]))
    path.write_text('{"text": "fine"}\n\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl, line 3: not valid JSON"):
        list(file_documents([path]))
    path.write_text('{"text": 3}\n')
    with pytest.raises(DataError, match="must be a string"):
        list(file_documents([path]))


def test_undecodable_files(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not UTF-8"):
        list(file_documents([latin1]))
    not_gzip = tmp_path / "plain.json.gz"
    not_gzip.write_text('{"text": "not compressed"}\n')
    with pytest.raises(DataError, match="plain.json.gz: not a valid gzip file"):
        list(file_documents([not_gzip]))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataError, match=r"unsupported type.*\.txt, \.jsonl"):
        file_documents([path])


def test_c4_without_tensorflow_datasets_names_the_data_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(DataError, match=r"pip install -e '\.\[data\]'"):
        TokenBatches(make_config(source="c4"), "train")


# Pipeline on the embedded corpus


@pytest.mark.parametrize("length", [32, 64])
def test_embedded_batches_shape_dtype_and_ids(length):
    cfg = make_config(length=length)
    train = TokenBatches(cfg, "train")
    for batch in take(train, 5):
        assert batch.shape == (8, length)
        assert batch.dtype == np.int32
        assert batch.min() >= 0 and batch.max() < cfg.training.vocab_size
    validation = validation_batches(cfg, 4)
    assert len(validation) == 4
    assert all(b.shape == (8, length) and b.dtype == np.int32 for b in validation)
    info = TokenBatches(cfg, "validation").describe()
    assert info["documents"] >= 1 and info["windows"] >= 8
    assert info["tokens"] < train.describe()["tokens"]


def test_embedded_split_is_deterministic_and_disjoint():
    cfg = make_config()
    texts = list(embedded_documents())
    in_validation = [validation_score(t) < cfg.training.validation_split for t in texts]
    assert 0 < sum(in_validation) < len(texts)
    train, validation = TokenBatches(cfg, "train"), TokenBatches(cfg, "validation")
    assert validation.num_documents == sum(in_validation)
    assert train.num_documents == len(texts) - sum(in_validation)
    expected_validation = set(
        expected_windows([t for t, v in zip(texts, in_validation, strict=True) if v], 32)
    )
    expected_train = set(
        expected_windows([t for t, v in zip(texts, in_validation, strict=True) if not v], 32)
    )
    validation_rows = {tuple(row) for b in validation for row in b}
    assert validation_rows <= expected_validation
    train_rows = {tuple(row) for b in take(train, train.batches_per_epoch) for row in b}
    assert train_rows <= expected_train
    assert not train_rows & validation_rows
    assert_same_batches(validation_batches(cfg, 3), validation_batches(cfg, 3))
    assert_same_batches(take(TokenBatches(cfg), 3), take(TokenBatches(cfg), 3))


def test_validation_does_not_depend_on_training_seed():
    assert_same_batches(
        validation_batches(make_config(seed=0), 2), validation_batches(make_config(seed=1), 2)
    )
    first = take(TokenBatches(make_config(seed=0)), 2)
    other = take(TokenBatches(make_config(seed=1)), 2)
    assert not np.array_equal(first[0], other[0])


def test_resume_matches_uninterrupted_embedded():
    cfg = make_config()
    uninterrupted = take(TokenBatches(cfg), 10)
    interrupted = TokenBatches(cfg)
    take(interrupted, 6)
    state = json.loads(json.dumps(interrupted.state()))
    assert state == {"split": "train", "epoch": 0, "index": 6}
    assert_same_batches(take(TokenBatches(cfg, state=state), 4), uninterrupted[6:])
    fresh = TokenBatches(cfg)
    fresh.restore(state)
    assert_same_batches(take(fresh, 4), uninterrupted[6:])


@pytest.mark.parametrize("process_count", [2, 4, 8])
def test_process_shards_union_is_global_batch(process_count):
    cfg = make_config()
    global_batches = take(TokenBatches(cfg), 3)
    shards = [
        take(TokenBatches(cfg, process_index=p, process_count=process_count), 3)
        for p in range(process_count)
    ]
    for step, global_batch in enumerate(global_batches):
        local = [shards[p][step] for p in range(process_count)]
        assert all(part.shape == (8 // process_count, 32) for part in local)
        np.testing.assert_array_equal(np.concatenate(local), global_batch)
    validation_parts = [
        validation_batches(cfg, 1, process_index=p, process_count=process_count)[0]
        for p in range(process_count)
    ]
    np.testing.assert_array_equal(np.concatenate(validation_parts), validation_batches(cfg, 1)[0])


def test_bad_process_layout():
    with pytest.raises(DataError, match="divisible by the number of processes"):
        TokenBatches(make_config(), process_count=3)
    with pytest.raises(DataError, match="process_index"):
        TokenBatches(make_config(), process_index=2, process_count=2)


def test_bad_split_and_state():
    with pytest.raises(DataError, match="split must be one of"):
        TokenBatches(make_config(), "test")
    batches = TokenBatches(make_config())
    with pytest.raises(DataError, match="cannot restore a 'validation'"):
        batches.restore({"split": "validation", "epoch": 0, "index": 0})
    with pytest.raises(DataError, match="lacks"):
        batches.restore({"epoch": 0})


# Pipeline on local files


@pytest.fixture
def small_corpus(tmp_path) -> tuple[Config, list[str]]:
    """A 'files' config over 60 synthetic documents in three files of the three formats."""
    texts = synthetic_documents(60)
    text_file = tmp_path / "00.txt"
    text_file.write_text(texts[0])
    jsonl_file = write_jsonl(tmp_path / "01.jsonl", texts[1:30])
    gz_file = tmp_path / "02.json.gz"
    with gzip.open(gz_file, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[30:])
    cfg = make_config(
        length=16,
        batch_size=4,
        source="files",
        data_files=(str(text_file), str(jsonl_file), str(gz_file)),
        validation_split=0.2,
    )
    return cfg, texts


def test_files_windows_follow_documents_with_eot(small_corpus):
    cfg, texts = small_corpus
    in_validation = [validation_score(t) < 0.2 for t in texts]
    train_texts = [t for t, v in zip(texts, in_validation, strict=True) if not v]
    validation_texts = [t for t, v in zip(texts, in_validation, strict=True) if v]
    assert sum(len(encode(t)) + 1 for t in validation_texts) >= 4 * 16, "no top-up expected"

    train = TokenBatches(cfg, "train")
    expected_train = expected_windows(train_texts, 16)
    assert train.num_windows == len(expected_train)
    assert train.batches_per_epoch == len(expected_train) // 4
    epoch = [tuple(row) for b in take(train, train.batches_per_epoch) for row in b]
    assert Counter(epoch) <= Counter(expected_train)
    assert len(expected_train) - len(epoch) < 4

    validation = [tuple(row) for b in TokenBatches(cfg, "validation") for row in b]
    expected_validation = expected_windows(validation_texts, 16)
    assert Counter(validation) <= Counter(expected_validation)
    assert len(validation) == len(expected_validation) // 4 * 4
    assert any(EOT_ID in row for row in epoch)


def test_epochs_reshuffle_and_resume_across_epoch_boundary(small_corpus):
    cfg, _ = small_corpus
    batches_per_epoch = TokenBatches(cfg).batches_per_epoch
    assert 5 <= batches_per_epoch <= 100
    total = batches_per_epoch + 4
    uninterrupted = take(TokenBatches(cfg), total)
    epoch0 = np.concatenate(uninterrupted[:batches_per_epoch])
    epoch1_start = np.concatenate(uninterrupted[batches_per_epoch:])
    assert not np.array_equal(epoch0[: len(epoch1_start)], epoch1_start)

    for stop in (batches_per_epoch - 2, batches_per_epoch, batches_per_epoch + 1):
        interrupted = TokenBatches(cfg)
        take(interrupted, stop)
        state = json.loads(json.dumps(interrupted.state()))
        assert_same_batches(
            take(TokenBatches(cfg, state=state), total - stop), uninterrupted[stop:]
        )
    assert interrupted.state()["epoch"] == 1


def test_validation_is_one_pass(small_corpus):
    cfg, _ = small_corpus
    validation = TokenBatches(cfg, "validation")
    batches = list(validation)
    assert len(batches) == validation.batches_per_epoch >= 1
    assert list(validation) == []
    assert len(validation_batches(cfg, 10_000)) == len(batches)


def test_tiny_corpus_tops_up_validation(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", synthetic_documents(12))
    cfg = make_config(length=16, batch_size=4, source="files", data_files=(str(path),))
    validation = TokenBatches(cfg, "validation")
    assert validation.num_windows >= 4
    train = TokenBatches(cfg, "train")
    assert train.num_documents + validation.num_documents == 12
    assert validation_batches(cfg, 1)[0].shape == (4, 16)


def test_corpus_too_small_for_a_batch(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", ["just a few words"])
    cfg = make_config(length=16, batch_size=4, source="files", data_files=(str(path),))
    with pytest.raises(DataError, match="too small"):
        TokenBatches(cfg, "train")


def test_window_permutation_is_fixed():
    order = window_permutation(10, "train", 0, 0)
    assert sorted(order.tolist()) == list(range(10))
    np.testing.assert_array_equal(order, window_permutation(10, "train", 0, 0))
    assert not np.array_equal(order, window_permutation(10, "train", 0, 1))


# C4 through TensorFlow Datasets (only where the optional extra is installed)


C4_MOCK_TEXTS = synthetic_documents(120)


@pytest.fixture
def mocked_c4(monkeypatch):
    """A 'c4' config whose TFDS reads serve C4_MOCK_TEXTS through `tfds.testing.mock_data`."""
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    def as_dataset(builder, split, *args, **kwargs):
        assert split == "train"
        return tf.data.Dataset.from_tensor_slices({"text": C4_MOCK_TEXTS})

    # Installed TFDS code only builds c4 3.1.0; 3.0.1 loads from prepared files alone.
    monkeypatch.setattr(sources_module, "C4_DATASET", "c4/en:3.1.0")
    monkeypatch.setattr(pipeline_module, "STREAM_SHUFFLE_WINDOWS", 8)
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=as_dataset):
        yield make_config(length=16, batch_size=4, source="c4", data_dir="/nonexistent/tfds")


def test_c4_stream_split_resume_and_epochs(mocked_c4):
    cfg = mocked_c4
    train = TokenBatches(cfg, "train")
    first = take(train, 3)
    assert all(b.shape == (4, 16) and b.dtype == np.int32 for b in first)
    assert train.describe()["tokens"] is None

    texts = list(sources_module.c4_documents("train", cfg.training.data_dir))
    assert texts == C4_MOCK_TEXTS
    is_validation = [validation_score(t) < cfg.training.validation_split for t in texts]
    train_texts = [t for t, v in zip(texts, is_validation, strict=True) if not v]
    validation_texts = [t for t, v in zip(texts, is_validation, strict=True) if v]
    expected_train = expected_windows(train_texts, 16)
    per_epoch = len(expected_train) // 4
    assert per_epoch >= 3
    uninterrupted = take(TokenBatches(cfg, "train"), per_epoch + 3)
    epoch0 = [tuple(row) for b in uninterrupted[:per_epoch] for row in b]
    assert Counter(epoch0) <= Counter(expected_train)
    assert epoch0 != expected_train[: len(epoch0)], "windows are shuffled within blocks"
    epoch1 = [tuple(row) for b in uninterrupted[per_epoch:] for row in b]
    assert epoch1 != epoch0[: len(epoch1)]

    for stop in (1, 5, per_epoch - 1, per_epoch + 1):
        interrupted = TokenBatches(cfg, "train")
        take(interrupted, stop)
        state = json.loads(json.dumps(interrupted.state()))
        resumed = take(TokenBatches(cfg, "train", state=state), len(uninterrupted) - stop)
        assert_same_batches(resumed, uninterrupted[stop:])

    validation = [tuple(row) for b in validation_batches(cfg) for row in b]
    assert validation == expected_windows(validation_texts, 16)[: len(validation)]
    assert validation


def test_c4_not_prepared_names_where_it_looked(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError, match=r"not prepared at '.*c4/en/3\.0\.1'.*Apache Beam"):
        sources_module.c4_documents("train", str(tmp_path))
