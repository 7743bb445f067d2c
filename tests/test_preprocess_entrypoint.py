"""The `preprocess` entry point: MLproject and click agree, bad input fails cleanly, lineage reaches
MLflow."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT
from mlflow import MlflowClient
from mlflow.projects._project_spec import load_project

from entrypoints.preprocess import main
from rlvr.dataset import load_split


def _project_entry():
    return load_project(str(ROOT)).get_entry_point("preprocess")


# --- MLproject <-> click ------------------------------------------------------------------------------------
def test_mlproject_command_passes_every_parameter_intact(tmp_path):
    tricky = {
        "instruction": 'Say "it\'s" in \\boxed{}; $x$ & {braces}',
        "system_prompt": "",
        "test_size": "0.25",
    }
    command = _project_entry().compute_command(tricky, storage_dir=str(tmp_path))
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "entrypoints.preprocess"]
    context = main.make_context("preprocess", argv[3:])
    assert context.params["instruction"] == tricky["instruction"] and context.params["system_prompt"] == ""
    assert (
        context.params["test_size"] == 0.25
        and context.params["source"] == "agentica-org/DeepScaleR-Preview-Dataset"
    )
    assert {p.name for p in main.params} == {arg.lstrip("-") for arg in argv[3::2]}


def test_environment_installs_this_project():
    project = load_project(str(ROOT))
    conda = yaml.safe_load(Path(project.env_config_path).read_text())
    assert Path(project.env_config_path).name == "conda.yaml"
    assert {"pip": ["."]} in conda["dependencies"] and "python=3.11" in conda["dependencies"]


def test_help_is_readable():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    for words in ("--source", "synthetic", "--max_invalid_fraction", "train.parquet", "--answer_field"):
        assert words in result.output


# --- bad input ----------------------------------------------------------------------------------------------
def _jsonl(rows):
    return "".join(json.dumps(row) + "\n" for row in rows)


GOOD = [{"problem": f"What is {i}+{i}?", "answer": str(2 * i)} for i in range(10)]

# (file name, file content or None for no file, extra arguments, words the error must contain)
FAILURES = {
    "empty file": ("empty.jsonl", "", [], "holds no rows"),
    "empty csv": ("empty.csv", "", [], "holds no rows"),
    "unknown extension": ("data.txt", "problem,answer\n1+1,2\n", [], "unknown extension"),
    "missing file": ("absent.jsonl", None, [], "does not exist"),
    "a directory": ("folder", "dir", [], "is a directory"),
    "missing problem column": ("x.jsonl", _jsonl([{"text": "1+1", "answer": "2"}]), [], "no problem column"),
    "override names no column": (
        "x.jsonl",
        _jsonl(GOOD),
        ["--answer_field", "gold"],
        "answer_field='gold' is not a column",
    ),
    "non-string answers": ("x.jsonl", _jsonl([{"problem": "p", "answer": [1]}] * 3), [], "no usable rows"),
    "unparseable answers": (
        "x.jsonl",
        _jsonl(GOOD[:7] + [{"problem": f"p{i}", "answer": "???"} for i in range(3)]),
        ["--max_invalid_fraction", "0.2"],
        "3 of 10 rows",
    ),
    "all rows invalid": ("x.csv", "problem,answer\n,1\n,2\n", [], "no usable rows"),
    "malformed json line": ("x.jsonl", _jsonl(GOOD[:1]) + "{oops\n", [], "line 2"),
    "hub id with no network": (
        "",
        None,
        ["--source", "no-such-org/no-such-dataset"],
        "could not be loaded as a hub dataset",
    ),
    "test split takes everything": ("x.jsonl", _jsonl(GOOD), ["--test_size", "10"], "leaving none"),
    "impossible test size": ("x.jsonl", _jsonl(GOOD), ["--test_size", "2.5"], "test_size=2.5"),
    "unknown synthetic option": ("", None, ["--source", "synthetic:level=9"], "unknown synthetic option"),
}


def _invoke(tmp_path, name, content, extra):
    source = tmp_path / name
    if content == "dir":
        source.mkdir()
    elif content is not None:
        source.write_text(content)
    output_dir = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "preprocess-bad-input")
        result = CliRunner().invoke(main, ["--source", str(source), "--output_dir", str(output_dir), *extra])
    return result, output_dir


@pytest.mark.parametrize("case", FAILURES, ids=list(FAILURES))
def test_bad_input_fails_cleanly(tracking_uri, tmp_path, case):
    name, content, extra, words = FAILURES[case]
    result, output_dir = _invoke(tmp_path, name, content, extra)
    assert result.exit_code == 1, result.output
    first_line = result.output.splitlines()[0]
    assert first_line.startswith("Error: ") and words in first_line and "Traceback" not in result.output
    assert not output_dir.exists()
    assert MlflowClient().get_run(mlflow.last_active_run().info.run_id).info.status == "FAILED"


def test_duplicates_are_dropped_and_reported(tracking_uri, tmp_path):
    rows = GOOD + [{**GOOD[0], "answer": "0"}, {"problem": "What is 0+0? ", "answer": "0"}]
    ids = [{"id": f"r{i % 10}", **row} for i, row in enumerate(GOOD)] + [
        {"id": "r0", "problem": "new", "answer": "1"}
    ]
    result, out = _invoke(tmp_path, "dup.jsonl", _jsonl(rows), ["--test_size", "0"])
    assert result.exit_code == 0 and "dropped (duplicate): 2" in result.output
    assert len(pd.read_parquet(out / "train.parquet")) == 10
    result, out = _invoke(tmp_path, "ids.jsonl", _jsonl(ids), ["--test_size", "0"])
    assert result.exit_code == 0 and "dropped (duplicate): 1" in result.output
    frame = pd.read_parquet(out / "train.parquet")
    assert frame["id"].is_unique and "new" not in {p[-1]["content"] for p in frame["prompt"]}
    metrics = MlflowClient().get_run(mlflow.last_active_run().info.run_id).data.metrics
    assert (metrics["rows_dropped_duplicate"], metrics["rows_train"]) == (1, 10)


def test_mixed_latex_and_unicode_survive_verbatim(tracking_uri, tmp_path):
    rows = [
        {"problem": "Soit $f(x)=\\sqrt{x}$ ; calculez f(4) — réponse ∈ ℕ.", "answer": "2"},
        {"problem": "求 $\\frac{1}{2}+\\frac{1}{3}$ 的值。", "answer": "\\frac{5}{6}"},
        {"problem": "Résoudre x² = 2 (x > 0).", "answer": "\\sqrt{2}"},
        {"problem": "Same, answered in unicode.", "answer": "√2"},
    ]
    result, out = _invoke(
        tmp_path,
        "mixed.jsonl",
        _jsonl(rows),
        ["--test_size", "0", "--instruction", "", "--max_invalid_fraction", "0.25"],
    )
    assert result.exit_code == 0 and "dropped (unparseable_answer): 1, e.g. '√2'" in result.output
    frame = pd.read_parquet(out / "train.parquet")
    kept = {p[-1]["content"]: s for p, s in zip(frame["prompt"], frame["solution"], strict=True)}
    assert kept == {row["problem"]: row["answer"] for row in rows[:3]}


# --- end to end through `mlflow run` ------------------------------------------------------------------------
def _mlflow_run(tracking_uri, experiment, *params):
    argv = [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "preprocess",
            "--experiment-name", experiment]  # fmt: skip
    for param in params:
        argv += ["-P", param]
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return subprocess.run(argv, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_mlflow_run_end_to_end_with_lineage(tracking_uri, tmp_path):
    output_dir = tmp_path / "data"
    done = _mlflow_run(
        tracking_uri,
        "preprocess-e2e",
        "source=synthetic:count=300",
        f"output_dir={output_dir}",
        "test_size=50",
        "seed=4",
        "instruction=Answer in \\boxed{}.",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("preprocess-e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert (
        run.data.params["source"] == "synthetic:count=300"
        and run.data.params["max_invalid_fraction"] == "0.1"
    )
    assert run.data.metrics["rows_train"] == 250 and run.data.metrics["rows_test"] == 50
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert artifacts == {"data/train.parquet", "data/test.parquet"}

    data_uri = f"runs:/{run.info.run_id}/data"
    logged = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(logged) == {"train", "test"}
    for split in ("train", "test"):
        local, remote = load_split(str(output_dir), split), load_split(data_uri, split)
        assert remote.source_uri == f"{data_uri}/{split}.parquet"
        assert (
            (logged[split].name, logged[split].digest)
            == (local.name, local.digest)
            == (remote.name, remote.digest)
        )
        assert json.loads(logged[split].source) == {"uri": remote.source_uri}
        assert logged[split].source_type == "mlflow_run_artifact"
        pd.testing.assert_frame_equal(local.frame, remote.frame)
        assert all(p[-1]["content"].endswith("? Answer in \\boxed{}.") for p in remote.frame["prompt"])

    # a downstream run that reads the data shows the same dataset
    with mlflow.start_run(experiment_id=client.create_experiment("preprocess-e2e-consumer")) as consumer:
        mlflow.log_input(load_split(data_uri, "train").mlflow_dataset(), context="train")
    (consumed,) = client.get_run(consumer.info.run_id).inputs.dataset_inputs
    assert (consumed.dataset.name, consumed.dataset.digest) == (logged["train"].name, logged["train"].digest)


def test_mlflow_run_failure_marks_the_run_failed(tracking_uri, tmp_path):
    done = _mlflow_run(tracking_uri, "preprocess-e2e-fail", f"source={tmp_path / 'absent.jsonl'}",
                       f"output_dir={tmp_path / 'out'}")  # fmt: skip
    assert done.returncode != 0 and "does not exist" in done.stderr
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("preprocess-e2e-fail").experiment_id])
    assert run.info.status == "FAILED" and not (tmp_path / "out").exists()
