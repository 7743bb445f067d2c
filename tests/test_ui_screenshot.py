"""docs/ui_screenshot.py: headless Chromium photographs the MLflow UI comparing runs of a real server."""

import os
import shutil
import subprocess
import sys
import uuid

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient
from PIL import Image

SCRIPT = ROOT / "docs" / "ui_screenshot.py"
EVALUATIONS = ("evaluate warmstart", "evaluate train_baseline", "evaluate train_reasoning")


def screenshot(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        missing = "Debian's chromium is not installed (apt-get install --no-install-recommends chromium)"
        if os.environ.get("RLVR_REQUIRE_CHROMIUM") == "1":  # CI installs it: there its absence is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    return found


def test_without_chromium_the_script_stops_with_one_line_naming_the_package(tmp_path):
    output = tmp_path / "ui.png"
    done = screenshot(
        "--chromium", "no-such-chromium", "--tracking-uri", "http://127.0.0.1:9", "--output", str(output)
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "no-such-chromium not found" in done.stderr and "apt-get install" in done.stderr
    assert "chromium" in done.stderr.split("apt-get install", 1)[1]
    assert not output.exists()


def test_the_screenshot_shows_the_compared_runs(chromium, tracking_uri, tmp_path):
    client = MlflowClient()
    experiment_name = f"ui-{uuid.uuid4().hex[:8]}"
    experiment = client.create_experiment(experiment_name)
    for accuracy, name in zip((0.4, 0.55, 0.6), EVALUATIONS, strict=True):
        run = client.create_run(experiment, run_name=name)
        client.log_param(run.info.run_id, "model", f"models:/demo/{name.split()[-1]}")
        client.log_metric(run.info.run_id, "eval/data/accuracy", accuracy)
        client.set_terminated(run.info.run_id)
    output = tmp_path / "shots" / "ui.png"
    width, height = 1200, 900

    done = screenshot(
        "--tracking-uri",
        tracking_uri,
        "--experiment",
        experiment_name,
        "--output",
        str(output),
        "--width",
        str(width),
        "--height",
        str(height),
        "--chromium",
        chromium,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ", ".join(EVALUATIONS) in done.stdout  # it waited until the page showed every run name
    with Image.open(output) as image:
        assert image.format == "PNG" and image.size == (width, height)
        colours = image.convert("RGB").getcolors(maxcolors=width * height)
    assert len(colours) > 500  # text, links and tables, not a blank or single-spinner page
    assert max(count for count, _ in colours) < 0.9 * width * height  # no colour fills the page

    missing = screenshot(
        "--tracking-uri",
        tracking_uri,
        "--experiment",
        experiment_name,
        "--output",
        str(tmp_path / "none.png"),
        "--runs",
        "evaluate nothing",
        "--chromium",
        chromium,
    )
    assert missing.returncode == 1
    expected = f"Error: no finished run named 'evaluate nothing' in experiment '{experiment_name}'"
    assert missing.stderr.strip() == expected
    assert not (tmp_path / "none.png").exists()
