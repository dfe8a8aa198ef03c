"""``to_tensorflow``: signature, values, and the spec's TensorFlow / Keras examples as written."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import LiveServer
from constants import (
    JOB_MIXED,
    JOB_UNIFORM,
    MIXED_TOTAL,
    UNIFORM_LABELS,
    UNIFORM_SIZE,
    UNIFORM_TOTAL,
)
from helpers import copy_without_counts, corrupt_copy, drop_counts, edited_copy
from pixcrawler import Dataset, load_dataset, loaders
from pixcrawler.exceptions import PixCrawlerError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Loading triton (a dependency of CUDA builds of torch, imported by torch.optim on first use)
# after TensorFlow segfaults the process (tensorflow-cpu 2.21 with triton 3.8); loaded first,
# they coexist. This module is collected before test_torch.py, so it loads triton first.
with contextlib.suppress(ImportError):
    import triton  # noqa: F401
tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _collect_tensorflow_garbage() -> Iterator[None]:
    """TensorFlow objects left in reference cycles (an error's traceback holds its
    iterator) must be freed here: collected later inside a forked DataLoader worker of
    another test, their destructors reach TensorFlow's threads, absent there, and abort."""
    yield
    gc.collect()


def open_job(live_server: LiveServer, job_id: str = JOB_UNIFORM, **options: object) -> Dataset:
    return load_dataset(
        job_id,
        api_key=live_server.api_key,
        base_url=live_server.base_url,
        **options,  # type: ignore[arg-type]
    )


def test_signature_is_uint8_images_and_int64_labels_fixed_by_the_jobs_size(
    live_server: LiveServer,
) -> None:
    tf_dataset = open_job(live_server).to_tensorflow()
    image_spec, label_spec = tf_dataset.element_spec
    assert image_spec.dtype == tf.uint8 and tuple(image_spec.shape) == (*UNIFORM_SIZE, 3)
    assert label_spec.dtype == tf.int64 and tuple(label_spec.shape) == ()
    assert len(tf_dataset) == UNIFORM_TOTAL


def test_values_equal_plain_iteration_with_label_ids(live_server: LiveServer) -> None:
    dataset = open_job(live_server)
    expected = [(image, dataset.labels.index(label)) for image, label in dataset]
    got = list(dataset.to_tensorflow().as_numpy_iterator())
    assert len(got) == UNIFORM_TOTAL
    for (image, label), (want_image, want_label) in zip(got, expected, strict=True):
        assert label.dtype == np.int64 and label == want_label
        np.testing.assert_array_equal(image, want_image)


def test_images_come_in_batches_unbatched_with_their_values_and_order(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The generator yields whole batches (one call into Python per image cost as much CPU
    as decoding it): several of them and a short last one give the same elements, each
    kept intact while later batches are made."""
    monkeypatch.setattr(loaders, "_TF_ROWS", 7)  # 60 images: eight batches and four left
    dataset = open_job(live_server)
    expected = [(image.copy(), dataset.labels.index(label)) for image, label in dataset]
    kept = list(dataset.to_tensorflow())  # eager tensors, all held to the end
    assert len(kept) == UNIFORM_TOTAL
    for (image, label), (want_image, want_label) in zip(kept, expected, strict=True):
        assert int(label) == want_label
        np.testing.assert_array_equal(image.numpy(), want_image)


def test_a_batch_of_the_generator_is_bounded_in_bytes_not_only_in_images(
    live_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """64 images of 1024x1024 RGB took 192 MB per batch: big images come fewer at a time,
    down to one by one."""
    assert loaders._tf_rows((32, 32, 3)) == 64
    assert loaders._tf_rows((224, 224, 3)) == 55  # 8 MiB
    assert loaders._tf_rows((1024, 1024, 3)) == 2
    assert loaders._tf_rows((4000, 3000, 3)) == 1
    height, width = UNIFORM_SIZE
    monkeypatch.setattr(loaders, "_TF_BATCH_BYTES", 3 * height * width * 3 + 1)
    sizes: list[int] = []
    real = loaders._tf_batches

    def noting(*args: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for images, labels in real(*args):
            sizes.append(len(images))
            yield images, labels

    monkeypatch.setattr(loaders, "_tf_batches", noting)
    dataset = open_job(live_server)
    expected = [image.copy() for image, _ in dataset]
    got = [image.numpy() for image, _ in dataset.to_tensorflow()]
    assert sizes == [1, 2] + [3] * ((UNIFORM_TOTAL - 3) // 3)  # the first at once
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_the_images_before_an_error_reach_the_pipeline(
    live_server: LiveServer,
    tmp_path: Path,
    server_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch cut short by an error is still yielded: image 5 is bad, batches hold 4, and
    images 0-4 come before the error, as they would one by one."""
    monkeypatch.setattr(loaders, "_TF_ROWS", 4)
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, (5,)))
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=base_url)
    good = [image.copy() for _, image in itertools.islice(open_job(live_server).iter_samples(), 5)]
    received = []
    with pytest.raises(tf.errors.OpError, match="DecompressionError"):
        for image, _ in dataset.to_tensorflow():
            received.append(image.numpy())
    assert len(received) == 5
    for got, want in zip(received, good, strict=True):
        np.testing.assert_array_equal(got, want)


def test_mixed_sizes_have_a_free_shape_unless_image_size_fixes_it(live_server: LiveServer) -> None:
    mixed = open_job(live_server, JOB_MIXED)
    assert tuple(mixed.to_tensorflow().element_spec[0].shape) == (None, None, 3)
    shapes = {tuple(image.shape) for image, _ in mixed.to_tensorflow().as_numpy_iterator()}
    assert len(shapes) > 1

    resized = mixed.to_tensorflow(image_size=(20, 24))
    assert tuple(resized.element_spec[0].shape) == (20, 24, 3)
    images, labels = next(iter(resized.batch(MIXED_TOTAL)))
    assert tuple(images.shape) == (MIXED_TOTAL, 20, 24, 3) and labels.dtype == tf.int64

    gray = open_job(live_server, JOB_MIXED, mode="L", image_size=(8, 8)).to_tensorflow()
    assert tuple(gray.element_spec[0].shape) == (8, 8, 1)


def test_an_image_unlike_the_size_the_job_lists_gets_the_sdks_error_naming_it(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """Another producer's job.json may list a size some image does not have: the fixed
    signature would fail mid-epoch with TensorFlow's shape error; ours names the image."""

    def lie(job: dict[str, object]) -> None:
        job["image_size"] = [32, 32]

    base_url = server_factory(edited_copy(live_server.store, tmp_path, JOB_MIXED, lie))
    dataset = load_dataset(JOB_MIXED, api_key=live_server.api_key, base_url=base_url)
    assert tuple(dataset.to_tensorflow().element_spec[0].shape) == (32, 32, 3)
    with pytest.raises(tf.errors.OpError) as info:
        for _ in dataset.to_tensorflow():
            pass
    assert "MixedImageSizesError" in info.value.message
    assert "lists every image as 32x32" in info.value.message
    assert "image_size=(H, W)" in info.value.message
    resized = dataset.to_tensorflow(image_size=(32, 32))  # asked for: resized, no error
    assert sum(1 for _ in resized) == MIXED_TOTAL


def test_skip_policy_leaves_the_cardinality_unknown(live_server: LiveServer) -> None:
    tf_dataset = open_job(live_server, on_error="skip").to_tensorflow()
    assert tf_dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY


def test_spec_example_5_tensorflow_training(live_server: LiveServer) -> None:
    tf.keras.utils.set_random_seed(0)
    # As written, with base_url added and 1 epoch for 10.
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)
    tf_dataset = dataset.to_tensorflow()

    tf_dataset = tf_dataset.batch(32).prefetch(tf.data.AUTOTUNE)

    model = tf.keras.Sequential(
        [
            tf.keras.layers.Conv2D(32, 3, activation="relu"),
            tf.keras.layers.MaxPooling2D(),
            tf.keras.layers.Flatten(),
            tf.keras.layers.Dense(10, activation="softmax"),
        ]
    )

    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    history = model.fit(tf_dataset, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.filterwarnings("ignore:Do not pass an `input_shape`")
def test_spec_keras_example_with_preprocess_take_skip_and_validation(
    live_server: LiveServer,
) -> None:
    from tensorflow.keras import layers, models

    tf.keras.utils.set_random_seed(0)
    # As written, with base_url added, 64x64 for 224x224 and 2 epochs for 10.
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=live_server.base_url)
    tf_dataset = dataset.to_tensorflow()

    def preprocess(image, label):  # type: ignore[no-untyped-def]
        image = tf.image.resize(image, [64, 64])
        image = tf.cast(image, tf.float32) / 255.0
        return image, label

    tf_dataset = tf_dataset.map(preprocess)

    dataset_size = dataset.num_images
    train_size = int(0.8 * dataset_size)
    train_dataset = tf_dataset.take(train_size).batch(32).prefetch(1)
    val_dataset = tf_dataset.skip(train_size).batch(32).prefetch(1)

    model = models.Sequential(
        [
            layers.Conv2D(32, 3, activation="relu", input_shape=(64, 64, 3)),
            layers.MaxPooling2D(),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Flatten(),
            layers.Dense(128, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )

    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])

    history = model.fit(train_dataset, validation_data=val_dataset, epochs=2, verbose=0)
    losses = history.history["loss"]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert len(history.history["val_loss"]) == 2
    labels = [int(label) for _, label in tf_dataset.skip(train_size).as_numpy_iterator()]
    assert len(labels) == UNIFORM_TOTAL - train_size
    assert set(labels) <= set(range(len(UNIFORM_LABELS)))


def test_an_sdk_error_in_the_pipeline_reaches_the_caller_naming_its_class_and_image(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    """tf.data runs the generator inside TensorFlow's runtime, which re-raises what it
    raised as a tf.errors exception: the SDK's class name, its message and the image id
    still reach the caller in its text."""
    dest = corrupt_copy(live_server.store, tmp_path, (5,))
    base_url = server_factory(dest)
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=base_url)
    bad_id = [s.id for s, _ in itertools.islice(open_job(live_server).iter_samples(), 6)][5]
    with pytest.raises(tf.errors.OpError) as info:
        for _ in dataset.to_tensorflow():
            pass
    assert "DecompressionError" in info.value.message
    assert bad_id in info.value.message


@pytest.mark.parametrize("on_error", ["skip", "warn"])
def test_corrupt_images_are_left_out_of_the_pipeline_with_skip_and_warn(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str], on_error: str
) -> None:
    """One corrupt image must not end a fit(): with skip or warn, the rest stream on."""
    bad = (3, 17, 40)
    base_url = server_factory(corrupt_copy(live_server.store, tmp_path, bad))
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, base_url, on_error=on_error)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count = sum(1 for _ in dataset.to_tensorflow())
    assert count == UNIFORM_TOTAL - len(bad)
    assert dataset.stats.skipped == len(bad)
    skipped = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(skipped) == (len(bad) if on_error == "warn" else 0)


def test_a_job_listing_no_image_counts_streams_with_an_unknown_cardinality(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    base_url = server_factory(copy_without_counts(live_server.store, tmp_path))
    dataset = load_dataset(JOB_UNIFORM, api_key=live_server.api_key, base_url=base_url)
    tf_dataset = dataset.to_tensorflow()
    assert tf_dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    assert sum(1 for _ in tf_dataset) == UNIFORM_TOTAL


@pytest.mark.parametrize("off_by", [1, -1])
def test_a_listed_total_the_chunks_do_not_hold_is_the_sdks_error_naming_the_job(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str], off_by: int
) -> None:
    """A job listing its total but no chunk's count gets that total as its cardinality:
    where the chunks hold another number, TensorFlow's own check ("expected to contain 61
    elements but contained only 60") named neither the job nor what was wrong with it."""

    def total_only(job: dict[str, Any]) -> None:
        drop_counts(job)
        job["total_images"] = UNIFORM_TOTAL + off_by

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, total_only)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    tf_dataset = dataset.to_tensorflow()
    assert tf_dataset.cardinality() == UNIFORM_TOTAL + off_by
    with pytest.raises(tf.errors.OpError) as info:
        for _ in tf_dataset:
            pass
    assert "DecompressionError" in info.value.message
    assert f"job {JOB_UNIFORM} lists {UNIFORM_TOTAL + off_by} images" in info.value.message


def test_a_job_listing_no_labels_is_refused_before_any_download(
    live_server: LiveServer, tmp_path: Path, server_factory: Callable[..., str]
) -> None:
    def unlabelled(job: dict[str, Any]) -> None:
        del job["labels"]

    store = edited_copy(live_server.store, tmp_path, JOB_UNIFORM, unlabelled)
    dataset = load_dataset(JOB_UNIFORM, live_server.api_key, server_factory(store))
    with pytest.raises(PixCrawlerError, match=f"job {JOB_UNIFORM} lists no labels"):
        dataset.to_tensorflow()
    assert dataset.stats.transfer.requests == 0
