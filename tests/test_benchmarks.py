"""The benchmarks still run: each on a tiny dataset, printing every row it promises.

Their figures mean nothing at this size (and timing belongs to the benchmarks, never to
tests); what is checked is that a refactor has not broken the scripts the speed and memory
targets are measured with.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script: str, *args: str, timeout: float = 150) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.timeout(180)
def test_the_streaming_benchmark_prints_every_row_on_a_tiny_job(tmp_path: Path) -> None:
    pytest.importorskip("fastapi", reason="the benchmark serves the job with the [server] extra")
    pytest.importorskip("sklearn", reason="the benchmark's photos come with the [demo] extra")
    out = run(
        "stream.py",
        *("--images-per-chunk", "12", "--chunks", "2", "--repeat", "1", "--rss-runs", "1"),
        *("--workdir", str(tmp_path)),
    )
    for row in (
        "decode ceiling (pool.map)",
        "physical limit (groups)",
        "end to end (static chunk host)",
        "ratio to the ceiling",
        "time to the first image",
        "end to end (reference server)",
        "the pipeline, chunks from memory",
        "the transfer's cost",
        "receive + chunk sha256",
        "per-image sha256",
        "peak RSS iterating 2 chunks",
        "peak RSS iterating 40 chunks",
        "40 chunks / 2 chunks",
        "peak RSS to_arrays(128x128)",
    ):
        assert row in out, f"no {row!r} row in:\n{out}"


@pytest.mark.timeout(120)
def test_the_transport_benchmark_measures_the_sdk_transport() -> None:
    out = run("transport.py", "--size-mb", "2", "--files", "2", "--repeat", "1")
    assert "urllib3 (the SDK)" in out and "MB/s" in out and "CPU s/GB" in out


@pytest.mark.timeout(240)
def test_the_torch_benchmark_compares_with_webdataset_on_a_tiny_job(tmp_path: Path) -> None:
    pytest.importorskip("torch", reason="the benchmark runs torch's DataLoader")
    pytest.importorskip("webdataset", reason="the benchmark's peer")
    pytest.importorskip("fastapi", reason="the benchmark serves the job with the [server] extra")
    out = run(
        "torch_loader.py",
        *("--images", "48", "--chunk-size", "16", "--epochs", "2", "--workers", "1"),
        *("--batch-size", "8", "--resize", "32", "--workdir", str(tmp_path)),
        timeout=220,
    )
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["images"] == 48
    assert len(figures["pixcrawler_img_s"]) == len(figures["webdataset_img_s"]) == 2
    assert figures["chunk_requests_per_epoch"] == [3, 0]  # epoch 2 from the disk cache


@pytest.mark.timeout(240)
def test_the_tensorflow_benchmark_compares_three_pipelines_on_a_tiny_job(tmp_path: Path) -> None:
    pytest.importorskip("tensorflow", reason="the benchmark runs tf.data")
    pytest.importorskip("fastapi", reason="the benchmark serves the job with the [server] extra")
    pytest.importorskip("sklearn", reason="the benchmark's photos come with the [demo] extra")
    out = run(
        "tf_data.py",
        *("--images", "40", "--size", "32", "--chunk-size", "16", "--repeats", "1"),
        *("--workdir", str(tmp_path)),
        timeout=220,
    )
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["images"] == 40
    for name in ("per-element", "to_tensorflow", "iter_batches"):
        assert len(figures[f"{name}_img_s"]) == 1
    assert "to_tensorflow / per-element" in out and "to_tensorflow / iter_batches" in out
