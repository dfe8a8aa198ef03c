"""The specification's examples, run as written against the local reference server.

Only the environment is added (``PIXCRAWLER_BASE_URL``); job ids and keys are the spec's
own (``job_123``, ``job_abc123``, ``key`` ...), served from copies of ``job_uniform``.
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from constants import INFO_FIELDS, JOB_UNIFORM, UNIFORM_TOTAL

pytestmark = pytest.mark.timeout(120)

SPEC_JOBS = ("job_123", "job_abc123", "job_id")
SPEC_KEYS = dict.fromkeys(("key", "your_api_key", "your_key", "mykey"), "default")


@pytest.fixture
def spec_server(
    tmp_path: Path,
    store: Path,
    server_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """A server holding the spec's job ids; PIXCRAWLER_BASE_URL points at it."""
    spec_store = tmp_path / "store"
    for job_id in SPEC_JOBS:
        shutil.copytree(store / JOB_UNIFORM, spec_store / job_id)
        job_file = spec_store / job_id / "job.json"
        job = json.loads(job_file.read_text())
        job["id"] = job_id
        job_file.write_text(json.dumps(job))
    base_url = server_factory(spec_store, SPEC_KEYS)
    monkeypatch.setenv("PIXCRAWLER_BASE_URL", base_url)
    monkeypatch.delenv("PIXCRAWLER_API_KEY", raising=False)
    return base_url


def process(*_: object) -> None:
    pass


def test_quick_start_basic_usage(spec_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pixcrawler import load_dataset

    # Load dataset (lazy loading)
    dataset = load_dataset(job_id="job_abc123", api_key="your_api_key")

    # Iterate through images
    for image, label in dataset:
        print(f"Image shape: {image.shape}, Label: {label}")

    # Or use with scikit-learn
    X, y = dataset.to_arrays()
    from sklearn.model_selection import train_test_split

    X_train, X_test, y_train, y_test = train_test_split(X, y)

    assert capsys.readouterr().out.count("Image shape: (32, 48, 3), Label: ") == UNIFORM_TOTAL
    assert len(X_train) + len(X_test) == len(y_train) + len(y_test) == UNIFORM_TOTAL


def test_example_1_simple_iteration(spec_server: str) -> None:
    from pixcrawler import load_dataset

    dataset = load_dataset("job_123", api_key="key")
    count = 0
    for image, label in dataset:
        print(f"Image: {image.shape}, Label: {label}")
        count += 1
    assert count == UNIFORM_TOTAL


def test_example_2_batch_processing(spec_server: str) -> None:
    from pixcrawler import load_dataset

    dataset = load_dataset("job_123", api_key="key")
    shapes = []
    for images, labels in dataset.iter_batches(batch_size=64):
        # images shape: (64, H, W, C); labels: list of 64 labels
        process(images, labels)
        shapes.append((images.shape, len(labels)))
    assert shapes == [((UNIFORM_TOTAL, 32, 48, 3), UNIFORM_TOTAL)]  # 60 images: one short batch


def test_streaming_api_batches_of_64(spec_server: str) -> None:
    from pixcrawler import load_dataset

    dataset = load_dataset("job_123", api_key="key")
    for batch in dataset.iter_batches(batch_size=64):
        images, labels = batch
        assert images.ndim == 4 and isinstance(labels, list)


def test_example_3_scikit_learn(spec_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import train_test_split

    from pixcrawler import load_dataset

    # Load dataset
    dataset = load_dataset("job_123", api_key="key")
    X, y = dataset.to_arrays()

    # Flatten images for sklearn
    X_flat = X.reshape(X.shape[0], -1)

    # Train/test split
    X_train, X_test, y_train, y_test = train_test_split(X_flat, y, test_size=0.2, random_state=42)

    # Train model
    clf = RandomForestClassifier()
    clf.fit(X_train, y_train)
    print(f"Accuracy: {clf.score(X_test, y_test)}")

    accuracy = float(capsys.readouterr().out.split("Accuracy: ")[1])
    assert accuracy > 0.5  # three colour-coded classes: far above chance (0.33)


def test_scikit_learn_integration_grid_search(
    spec_server: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sklearn.model_selection import GridSearchCV, train_test_split
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    from pixcrawler import load_dataset

    dataset = load_dataset("job_123", api_key="key")
    X, y = dataset.to_arrays()

    # Flatten and normalize
    X_flat = X.reshape(X.shape[0], -1)
    scaler = StandardScaler()
    X_scaled = scaler.fit_transform(X_flat)

    # Split
    X_train, X_test, y_train, y_test = train_test_split(X_scaled, y, test_size=0.2)

    # Grid search
    param_grid = {"C": [0.1, 1, 10], "kernel": ["rbf", "linear"]}
    grid = GridSearchCV(SVC(), param_grid, cv=5)
    grid.fit(X_train, y_train)

    print(f"Best params: {grid.best_params_}")
    print(f"Test accuracy: {grid.score(X_test, y_test)}")
    assert "Best params: {'C':" in capsys.readouterr().out


def test_example_6_pandas(spec_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("pandas")
    from pixcrawler import load_dataset

    dataset = load_dataset("job_123", api_key="key")
    df = dataset.to_dataframe()

    # Analyze dataset
    print(df.head())
    print(df["label"].value_counts())
    print(df.describe())

    # Filter by label
    cat_images = df[df["label"] == "cat"]
    print(f"Found {len(cat_images)} cat images")
    assert f"Found {UNIFORM_TOTAL // 3} cat images" in capsys.readouterr().out


def test_core_concepts_lazy_loading(spec_server: str) -> None:
    from pixcrawler import load_dataset

    dataset = load_dataset("job_id", api_key="key")  # No download yet
    assert dataset.stats.transfer.requests == 0
    for image, _label in dataset:  # Downloads chunk 1
        process(image)
    assert dataset.stats.chunks == dataset.num_chunks


def test_error_handling_example(spec_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pixcrawler import load_dataset
    from pixcrawler.exceptions import AuthenticationError, DownloadError, JobNotCompleteError

    try:
        dataset = load_dataset("job_123", api_key="wrong key")

        for image, _label in dataset:
            process(image)

    except AuthenticationError:
        print("Invalid API key")
    except JobNotCompleteError as e:
        print(f"Job still processing: {e.progress}% complete")
    except DownloadError as e:
        print(f"Download failed: {e.chunk_id}")
    except Exception as e:
        print(f"Unexpected error: {e}")
    assert capsys.readouterr().out == "Invalid API key\n"


def test_manual_retry_with_tenacity(spec_server: str) -> None:
    pytest.importorskip("tenacity")
    from tenacity import retry, stop_after_attempt, wait_exponential

    from pixcrawler import load_dataset

    @retry(stop=stop_after_attempt(3), wait=wait_exponential(multiplier=1, min=2, max=10))
    def load_with_retry(job_id: str, api_key: str) -> object:
        return load_dataset(job_id, api_key)

    dataset = load_with_retry("job_123", "key")
    assert len(dataset) == UNIFORM_TOTAL  # type: ignore[arg-type]


def test_best_practices(spec_server: str) -> None:
    from tqdm import tqdm

    from pixcrawler import load_dataset

    # 3. Parallel downloads
    dataset = load_dataset("job_id", api_key="key", max_workers=8)
    # 5. Progress tracking
    seen = 0
    for image, _label in tqdm(dataset, total=dataset.num_images, disable=True):
        process(image)
        seen += 1
    assert seen == UNIFORM_TOTAL

    # 6. Resource cleanup: context manager, and explicit close
    with load_dataset("job_id", api_key="key") as dataset:
        for image, _label in dataset:
            process(image)
    dataset = load_dataset("job_id", api_key="key")
    try:
        for image, _label in dataset:
            process(image)
    finally:
        dataset.close()  # Release resources

    # 2. Batches: train_model(image.reshape(1, -1), [label]) also works on one image
    image, label = next(iter(load_dataset("job_id", api_key="key")))
    assert image.reshape(1, -1).shape == (1, int(np.prod(image.shape))) and [label]


def test_api_reference_docstring_example(spec_server: str) -> None:
    from pixcrawler import load_dataset

    dataset = load_dataset("job_123", api_key="key")
    for image, _label in dataset:
        assert image.shape == (32, 48, 3)
    assert dataset.num_chunks == 4 and dataset.chunk_size == 16


def test_cli_examples(
    spec_server: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pixcrawler.cli import run

    def pixcrawler(command_line: str) -> int:  # the spec's line, as a shell would split it
        return run(shlex.split(command_line)[1:])

    monkeypatch.chdir(tmp_path)
    # Download to numpy arrays
    assert pixcrawler("pixcrawler download job_123 --api-key mykey") == 0
    X, y = np.load("datasets/job_123/X.npy"), np.load("datasets/job_123/y.npy")
    assert X.shape == (UNIFORM_TOTAL, 32, 48, 3) and y.shape == (UNIFORM_TOTAL,)
    # Download as image files
    assert (
        pixcrawler(
            "pixcrawler download job_123 --api-key mykey --format images --output-dir ./my_dataset"
        )
        == 0
    )
    written = [p for p in Path("my_dataset/job_123").rglob("*") if p.suffix in (".jpg", ".png")]
    assert len(written) == UNIFORM_TOTAL
    # Fast parallel download (into ./datasets again: already complete, nothing to fetch)
    assert pixcrawler("pixcrawler download job_123 --api-key mykey --max-workers 8") == 0
    assert np.array_equal(np.load("datasets/job_123/X.npy"), X)
    assert pixcrawler("pixcrawler download job_abc123 --api-key mykey --max-workers 8") == 0
    assert np.array_equal(np.load("datasets/job_abc123/X.npy"), X)
    capsys.readouterr()
    assert pixcrawler("pixcrawler list --api-key mykey") == 0
    listed = capsys.readouterr().out
    assert all(job_id in listed for job_id in SPEC_JOBS)
    assert pixcrawler("pixcrawler info job_123 --api-key mykey") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == list(INFO_FIELDS)
    assert lines[0] == "Dataset: job_123" and lines[2] == f"Images: {UNIFORM_TOTAL}"
