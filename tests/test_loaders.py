"""The framework bridges without the frameworks: lazy imports and extras that fail helpfully."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from pixcrawler import Dataset
from pixcrawler.dataset import ClientSettings
from pixcrawler.exceptions import MissingDependencyError, PixCrawlerError
from pixcrawler.loaders import require
from pixcrawler.models import Chunk, Job
from pixcrawler.retry import RetryPolicy

pytestmark = pytest.mark.timeout(60)

FRAMEWORKS = ("torch", "tensorflow", "pandas")


@pytest.fixture
def offline() -> Dataset:
    """A dataset over a job that is never contacted: the error must come first."""
    job = Job(
        id="job_offline",
        name="offline",
        status="completed",
        total_images=1,
        labels=("cat",),
        chunks=(Chunk(index=0, url="/jobs/job_offline/chunks/0", image_count=1),),
    )
    settings = ClientSettings(
        api_key="key",
        base_url="http://127.0.0.1:9",
        timeout=1.0,
        verify_ssl=True,
        retry=RetryPolicy(retries=0),
        max_workers=1,
    )
    return Dataset(job, settings)


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_the_sdk_imports_no_framework() -> None:
    result = run_python(
        """
        import sys
        import pixcrawler, pixcrawler.loaders, pixcrawler.cache, pixcrawler.dataset
        print(sorted({"torch", "tensorflow", "pandas", "torchvision"} & set(sys.modules)))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("module", "call", "extra"),
    [
        ("torch", lambda d: d.to_torch(), "torch"),
        ("torch", lambda d: d.to_torch(streaming=True), "torch"),
        ("tensorflow", lambda d: d.to_tensorflow(), "tensorflow"),
        ("pandas", lambda d: d.to_dataframe(), "pandas"),
    ],
)
def test_a_missing_framework_names_the_extra_to_install(
    offline: Dataset, monkeypatch: pytest.MonkeyPatch, module: str, call: object, extra: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an absent package looks like
    with pytest.raises(MissingDependencyError) as info:
        call(offline)  # type: ignore[operator]
    assert f'pip install "pixcrawler-sdk[{extra}]"' in str(info.value)
    assert isinstance(info.value, ImportError) and isinstance(info.value, PixCrawlerError)
    assert offline.stats.transfer.requests == 0


@pytest.mark.parametrize(
    "error",
    [
        ImportError("libtorch_cuda.so: cannot open shared object file"),
        ModuleNotFoundError("No module named 'typing_extensions'", name="typing_extensions"),
    ],
)
def test_a_framework_installed_but_broken_is_not_called_missing(
    monkeypatch: pytest.MonkeyPatch, error: ImportError
) -> None:
    """It said "torch is required for this; install it with ...": installed, it was, and
    installing it again would not mend a library it cannot load."""

    def broken(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torch":
            raise error
        return real(name, *args, **kwargs)

    real = importlib.import_module
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(MissingDependencyError) as info:
        require("torch", "torch")
    assert str(info.value) == f"torch is installed but could not be imported: {error}"
    assert info.value.__cause__ is error


@pytest.mark.parametrize("module", ["sklearn", "sklearn.svm"])
def test_a_framework_not_installed_is_named_as_the_package_users_install(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.delitem(sys.modules, "sklearn.svm", raising=False)
    with pytest.raises(MissingDependencyError) as info:
        require(module, "demo", "scikit-learn")
    assert str(info.value) == (
        'scikit-learn is required for this; install it with: pip install "pixcrawler-sdk[demo]"'
    )


def test_without_torch_installed_to_torch_says_how_to_get_it() -> None:
    result = run_python(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed at all
        from pixcrawler import Dataset
        from pixcrawler.dataset import ClientSettings
        from pixcrawler.models import Job
        from pixcrawler.retry import RetryPolicy
        settings = ClientSettings("k", "http://127.0.0.1:9", 1.0, True, RetryPolicy(), 1)
        try:
            Dataset(Job(id="j", name="j", status="completed"), settings).to_torch()
        except ImportError as exc:
            print(type(exc).__name__, exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("MissingDependencyError")
    assert 'pip install "pixcrawler-sdk[torch]"' in result.stdout


def test_a_chunks_own_shuffle_is_not_the_chunk_orders_stream_again() -> None:
    """A SeedSequence ignores trailing zero words: chunk 0's order, drawn under the chunk
    order's word, was the chunk order's permutation itself (for as many images as chunks)."""
    from types import SimpleNamespace

    from pixcrawler.loaders import _Sequence

    same = []
    for seed in range(5):
        owner = SimpleNamespace(_counts=dict.fromkeys(range(5), 5), shuffle=True, seed=seed)
        sequence = _Sequence(owner, epoch=0)  # type: ignore[arg-type]
        # (The chunk order is the permutation drawn of the chunks 0 to 4.)
        same.append(sequence.offsets(sequence.order.index(0), 0, 5) == sequence.order)
    assert not all(same)
