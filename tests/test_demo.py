"""``pixcrawler demo``: real digits, packed, served, loaded and learned, in seconds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pixcrawler import cli
from pixcrawler.demo import DIGITS_PER_CLASS, JOB_ID, MIN_IMAGES_PER_CLASS, run_demo, write_digits
from pixcrawler.exceptions import MissingDependencyError

pytest.importorskip("sklearn", reason="the demo needs the [demo] extra")
pytest.importorskip("fastapi", reason="the demo needs the [server] extra")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.timeout(60)
def test_run_demo_learns_the_digits_it_served(tmp_path: Path) -> None:
    lines: list[str] = []
    result = run_demo(tmp_path / "demo", images_per_class=40, echo=lines.append)
    assert result.job_id == JOB_ID
    assert result.num_images == 400 and result.num_chunks == 2  # chunks of 200
    assert result.skipped == 0
    assert result.train_size + result.test_size == 400
    assert result.images_per_second > 0
    assert result.accuracy > 0.8
    text = "\n".join(lines)
    assert "Dataset: demo_digits" in text and "Labels: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9" in text
    assert "images/s" in text and "test accuracy" in text
    digits = tmp_path / "demo" / "digits"
    pngs, jpgs = list(digits.rglob("*.png")), list(digits.rglob("*.jpg"))
    assert len(pngs) == len(jpgs) == 200
    assert sorted(p.name for p in digits.iterdir() if p.is_dir()) == [str(d) for d in range(10)]


def test_write_digits_makes_labelled_png_and_jpeg_files(tmp_path: Path) -> None:
    from PIL import Image

    total, counts = write_digits(tmp_path, 3, size=16)
    assert total == 30 and counts == {str(d): 3 for d in range(10)}
    with Image.open(tmp_path / "7" / "0000.png") as image:
        assert (image.size, image.mode) == ((16, 16), "L")
    with Image.open(tmp_path / "7" / "0001.jpg") as image:
        assert image.format == "JPEG"
    with pytest.raises(ValueError, match="images_per_class must be from 1 to"):
        write_digits(tmp_path, 10_000)


def test_the_demo_refuses_a_workdir_it_did_not_write(tmp_path: Path) -> None:
    (tmp_path / "digits").mkdir()
    (tmp_path / "digits" / "precious.txt").write_text("mine")
    with pytest.raises(ValueError, match="choose an empty --workdir"):
        run_demo(tmp_path, images_per_class=10, echo=lambda _: None)
    assert (tmp_path / "digits" / "precious.txt").exists()


@pytest.mark.timeout(60)
def test_the_demo_replaces_only_its_own_digits_folder(tmp_path: Path) -> None:
    """A refused run writes nothing; a folder the user makes where the demo's was is the
    user's, even in a workdir the demo used before."""
    with pytest.raises(ValueError, match="images_per_class must be from 10 to 174"):
        run_demo(tmp_path, images_per_class=500, echo=lambda _: None)
    assert list(tmp_path.iterdir()) == []
    # Fewer than 10 failed in scikit-learn's split, once the whole job was packed and loaded.
    (option,) = [p for p in cli.demo.params if p.name == "images_per_class"]
    assert (option.type.min, option.type.max) == (MIN_IMAGES_PER_CLASS, DIGITS_PER_CLASS)
    with pytest.raises(ValueError, match="images_per_class must be from 10 to 174, got 3"):
        run_demo(tmp_path, images_per_class=3, echo=lambda _: None)
    assert list(tmp_path.iterdir()) == []

    assert run_demo(tmp_path, images_per_class=10, echo=lambda _: None).num_images == 100
    assert run_demo(tmp_path, images_per_class=10, echo=lambda _: None).skipped == 0  # again

    shutil.rmtree(tmp_path / "digits")
    (tmp_path / "digits" / "my_scans").mkdir(parents=True)
    (tmp_path / "digits" / "my_scans" / "thesis.tif").write_bytes(b"mine")
    with pytest.raises(ValueError, match="choose an empty --workdir"):
        run_demo(tmp_path, images_per_class=10, echo=lambda _: None)
    assert (tmp_path / "digits" / "my_scans" / "thesis.tif").read_bytes() == b"mine"


def test_without_scikit_learn_the_demo_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "sklearn" or name.startswith("sklearn."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "pixcrawler-sdk\[demo\]"'):
        run_demo(echo=lambda _: None)


@pytest.mark.parametrize("module", ["fastapi", "uvicorn"])
def test_without_the_server_the_demo_names_the_one_extra_that_brings_both(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, module: str
) -> None:
    """With scikit-learn alone ([demo] as it was), the demo then asked for [server]: two
    installs, one error at a time. The demo extra now brings the server's packages."""
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingDependencyError, match=r'pip install "pixcrawler-sdk\[demo\]"'):
        run_demo(tmp_path / "work", echo=lambda _: None)
    assert not (tmp_path / "work").exists()  # said before anything is written


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_pixcrawler_demo_runs_end_to_end(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "pixcrawler"
    if not script.exists():
        pytest.fail("the pixcrawler console script is not installed: pip install -e . --no-deps")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIXCRAWLER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [str(script), "demo", "--images-per-class", "60"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.search(r"test accuracy (\d\.\d+)", done.stdout)
    assert match, done.stdout
    assert float(match.group(1)) > 0.8
    assert "images/s" in done.stdout
    assert "Dataset: demo_digits" in done.stdout
