"""Bad input at every entry point, as one table: each case is refused the same way.

For every case the command must exit non-zero with one line (`Error: ...`, or for `mlflow run --backend
slurm` MLflow's one `=== ... ===` line) that names the input and says the fix, with no traceback; the
directory the case works in (its output_dir included) must be exactly as it was, no model version may be
registered and no MLflow run may be left RUNNING. Commands run in-process through click; the cases marked
`PROCESS` run as real processes, to pin the exit status and stderr that a shell sees.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import MAP, MICRO_N, ROOT, TOKEN_MAP_CHANGES, pickled_weights, remote_code
from mlflow.entities import ViewType
from mlflow.tracking import MlflowClient

from rlvr.dataset import SCHEMA
from rlvr.models import load_model, save_model
from rlvr.preprocess import Options, preprocess

EXPERIMENT = "bad-input"
PROCESS = "process"  # run this case as `python -m entrypoints.<entry point>`
MEGABYTE = 2**20


# --- the bad inputs that cases write into their own directory -----------------------------------------------
def file(name: str, content: str | bytes) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        (work / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return make


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def data_dir(name: str, frame: pd.DataFrame, schema: pa.Schema | None = None) -> Callable[[Path], None]:
    """A directory that looks like a preprocess output: train.parquet and test.parquet holding `frame`."""

    def make(work: Path) -> None:
        (work / name).mkdir()
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        for split in ("train", "test"):
            pq.write_table(table, work / name / f"{split}.parquet")

    return make


def together(*makes: Callable[[Path], None]) -> Callable[[Path], None]:
    def make(work: Path) -> None:
        for one in makes:
            one(work)

    return make


def existing_output(*files: str) -> Callable[[Path], None]:
    """An output_dir already holding `files` (from an earlier job), which a refused command must not touch."""

    def make(work: Path) -> None:
        for name in files:
            (work / "out" / name).parent.mkdir(parents=True, exist_ok=True)
            (work / "out" / name).write_text(f"earlier {name}\n")

    return make


GOOD_ROWS = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(8)]
NON_UTF8_JSONL = b'{"problem": "What is 1+1?", "answer": "2"}\n{"problem": "caf\xe9 \xff", "answer": "3"}\n'
NON_UTF8_CSV = b"problem,answer\nWhat is 1+1?,2\ncaf\xe9 \xff,3\n"
HUGE_PROBLEM = [{"id": "huge", "problem": "What is " * (MEGABYTE // 8), "answer": "1"}, *GOOD_ROWS]
PROMPT = [{"role": "user", "content": "What is 1+1?"}]
WRONG_TYPES = pd.DataFrame(  # the answer column holds integers
    {"id": ["a"], "source": ["x"], "prompt": [PROMPT], "solution": [2], "reference": [""]}
)
NO_PROMPT = pd.DataFrame({"id": ["a"], "source": ["x"], "solution": ["2"], "reference": ["<think>2</think>"]})
NO_ROWS = pd.DataFrame({name: pd.Series([], dtype=object) for name in SCHEMA.names})

# Arguments every case of an entry point starts from (a later option overrides an earlier one): requests
# small enough that only the bad input can stop them.
BASE = {
    "preprocess": "--output_dir {out}",
    "warmstart": "--model {micro} --data {data} --output_dir {out} --max_steps 1 "
    "--registered_model_name never",
    "train_baseline": "--model {micro} --data {data} --output_dir {out} --max_steps 1 --num_generations 4 "
    "--per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_completion_length 4 "
    "--registered_model_name never",
    "evaluate": "--model {micro} --data {data} --max_new_tokens 2 --num_samples 1",
    "analyze": "",
    "main": "--scale ci --output_dir {out}",
    "slurm": "--backend slurm --env-manager local -e preprocess",  # after `mlflow run <project>`
}
BASE["train_reasoning"] = BASE["train_baseline"]


@dataclass(frozen=True)
class Case:
    """One bad input: the entry point (the first word of the case's id), its arguments, what the error line
    must name (the parameter or path) and the fix it must say; `make` writes the bad input into the case's
    directory first."""

    entry: str
    args: str
    names: str
    fix: str
    make: Callable[[Path], None] | None
    how: str


def case(id: str, args: str, names: str, fix: str, make=None, how: str = "in-process"):
    entry = id.split("-", 1)[0]
    return pytest.param(Case(entry, f"{BASE[entry]} {args}", names, fix, make, how), id=id)


def slurm(id: str, config: dict, names: str, fix: str, extra: str = ""):
    backend_config = shlex.quote(json.dumps({"partition": "debug", **config}))
    return case(id, f"--backend-config {backend_config} {extra}", names, fix)


LISTS = jsonl([{"problem": f"p{i}", "answer": [i]} for i in range(4)])
NUMBERS = jsonl([{"problem": i, "answer": "3"} for i in range(4)])
NO_PROBLEM = jsonl([{"text": "1+1", "answer": "2"}])
HEADER_ONLY = "problem,answer\n"
DELETED_NOTE = "mlflow runs restore --run-id {deleted}"

CASES = [
    # preprocess: missing and empty files, undecodable text, wrong column types, impossible numbers
    case("preprocess-missing-file", "--source {work}/absent.jsonl", "{work}/absent.jsonl", "check the path"),
    case("preprocess-empty-jsonl", "--source {work}/empty.jsonl", "'empty.jsonl' holds no rows",
         "pass a source with data", file("empty.jsonl", "")),
    case("preprocess-header-only-csv", "--source {work}/header.csv", "'header.csv' holds no rows",
         "pass a source with data", file("header.csv", HEADER_ONLY)),
    case("preprocess-non-utf8-jsonl", "--source {work}/latin1.jsonl", "{work}/latin1.jsonl' is not UTF-8",
         "re-save it as UTF-8", file("latin1.jsonl", NON_UTF8_JSONL), how=PROCESS),
    case("preprocess-non-utf8-csv", "--source {work}/latin1.csv", "{work}/latin1.csv' is not UTF-8",
         "re-save it as UTF-8", file("latin1.csv", NON_UTF8_CSV)),
    case("preprocess-json-not-a-table", "--source {work}/scalar.json", "{work}/scalar.json",
         "write one of those", file("scalar.json", "42")),
    case("preprocess-answers-are-lists", "--source {work}/lists.jsonl", "'lists.jsonl'",
         "fix the field mapping", file("lists.jsonl", LISTS)),
    case("preprocess-problems-are-numbers", "--source {work}/numbers.jsonl", "'numbers.jsonl'",
         "fix the field mapping", file("numbers.jsonl", NUMBERS)),
    case("preprocess-no-problem-column", "--source {work}/text.jsonl", "'text.jsonl' has no problem column",
         "pass problem_field=<column>", file("text.jsonl", NO_PROBLEM)),
    case("preprocess-answer-field-not-a-column", "--source {work}/good.jsonl --answer_field gold",
         "answer_field='gold'", "name one of those", file("good.jsonl", jsonl(GOOD_ROWS))),
    case("preprocess-test-size-nan", "--source synthetic:count=20 --test_size nan", "test_size=nan",
         "pass e.g. 0.1 or 500"),
    case("preprocess-test-size-inf", "--source synthetic:count=20 --test_size inf", "test_size=inf",
         "pass e.g. 0.1 or 500"),
    case("preprocess-max-invalid-fraction-nan", "--source synthetic:count=20 --max_invalid_fraction nan",
         "max_invalid_fraction=nan", "pass e.g. 0.1"),
    case("preprocess-negative-max-samples", "--source synthetic:count=20 --max_samples -1", "max_samples=-1",
         "pass 0 to keep every row"),
    case("preprocess-output-dir-is-a-file", "--source synthetic:count=20 --output_dir {work}/out.txt",
         "{work}/out.txt' is a file", "pass a directory", file("out.txt", "earlier\n")),
    case("preprocess-bad-source-keeps-earlier-output", "--source {work}/text.jsonl",
         "'text.jsonl' has no problem column", "pass problem_field=<column>",
         together(file("text.jsonl", NO_PROBLEM), existing_output("train.parquet", "test.parquet"))),
    case("preprocess-unknown-reasoning-gym-generator", "--source reasoning_gym:basic_arithmetc",
         "'basic_arithmetc' is not a reasoning-gym generator", "did you mean basic_arithmetic"),
    case("preprocess-reasoning-gym-seed-in-source", "--source reasoning_gym:chain_sum,seed=3",
         "option 'seed=3'", "-P seed=..."),
    case("preprocess-reasoning-gym-unknown-field", "--source reasoning_gym:chain_sum,chain_sum.max_ops=2",
         "chain_sum has no settable config field 'max_ops'", "its fields are"),
    case("preprocess-reasoning-gym-refused-config",
         "--source reasoning_gym:chain_sum,chain_sum.min_terms=5,chain_sum.max_terms=2",
         "reasoning-gym refused the configuration", "change the generator fields"),
    # warmstart
    case("warmstart-missing-data-dir", "--data {work}/nodata", "{work}/nodata",
         "pass the output_dir of a finished preprocess run"),
    case("warmstart-unknown-preset", "--model nano", "model 'nano' is not a preset", "Fix the name"),
    case("warmstart-learning-rate-nan", "--learning_rate nan", "learning_rate=nan",
         "pass a finite value, e.g. the default 0.0012"),
    case("warmstart-infinite-epochs", "--max_steps -1 --num_train_epochs inf", "num_train_epochs=inf",
         "pass a finite value"),
    case("warmstart-zero-max-steps", "--max_steps 0", "max_steps=0", "or -1 to train for num_train_epochs"),
    case("warmstart-negative-max-length", "--max_length -5", "max_length=-5", "must be at least 1"),
    case("warmstart-truncated-safetensors", "--model {truncated}", "{truncated}",
         "copy or save it again, or pass an intact checkpoint"),
    case("warmstart-data-without-worked-solutions", "--data {no_references}",
         "data '{no_references}' has no worked solutions", "warm-start on a source with references"),
    case("warmstart-data-without-prompt-column", "--data {work}/noprompt", "{work}/noprompt/train.parquet",
         "run the preprocess entry point", data_dir("noprompt", NO_PROMPT)),
    # train_baseline and train_reasoning
    case("train_baseline-learning-rate-nan", "--learning_rate nan", "learning_rate=nan",
         "pass a finite value, e.g. the default 1e-06"),
    case("train_baseline-temperature-inf", "--temperature inf", "temperature=inf", "pass a finite value"),
    case("train_baseline-beta-nan", "--beta nan", "beta=nan", "pass a finite value"),
    case("train_baseline-format-weight-inf", "--format_weight inf", "format_weight=inf",
         "pass a finite value"),
    case("train_baseline-zero-max-steps", "--max_steps 0", "max_steps=0", "pass e.g. max_steps=100"),
    case("train_baseline-max-steps-minus-two", "--max_steps -2", "max_steps=-2", "pass e.g. max_steps=100"),
    case("train_baseline-zero-epochs", "--max_steps -1 --num_train_epochs 0", "num_train_epochs=0.0",
         "pass a positive num_train_epochs"),
    case("train_baseline-zero-num-generations", "--num_generations 0", "num_generations=0",
         "must be at least 1"),
    case("train_baseline-unknown-loss-type", "--loss_type ppo", "loss_type='ppo'",
         "use one of grpo, dr_grpo"),
    case("train_baseline-negative-log-completions-steps", "--log_completions_steps -1",
         "log_completions_steps=-1", "pass 0 to log none"),
    case("train_baseline-missing-grpo-config", "--grpo_config {work}/grpo.yaml",
         "grpo_config {work}/grpo.yaml", "pass the path of a YAML mapping"),
    case("train_baseline-prompts-longer-than-max-prompt-length", "--max_prompt_length 2",
         "max_prompt_length=2", "raise max_prompt_length"),
    case("train_baseline-data-answers-are-numbers", "--data {work}/ints", "{work}/ints/train.parquet",
         "run the preprocess entry point", data_dir("ints", WRONG_TYPES)),
    case("train_baseline-empty-train-split", "--data {work}/empty",
         "data '{work}/empty' has no rows in its 'train' split", "pass another split or data with rows",
         data_dir("empty", NO_ROWS, SCHEMA)),
    case("train_baseline-data-of-a-deleted-run", "--data runs:/{deleted}/data", "data='runs:/{deleted}/data'",
         DELETED_NOTE),
    case("train_baseline-finished-output-dir-untouched", "", "output_dir {out} already holds a finished",
         "choose a new output_dir", existing_output("final/reasoning_token_map.json", "mlflow_run.json")),
    case("train_reasoning-negative-vocab-size", "--reasoning_vocab_size -5", "reasoning_vocab_size=-5",
         "use 0 for the baseline", how=PROCESS),
    case("train_reasoning-truncated-safetensors", "--model {truncated}", "{truncated}",
         "copy or save it again"),
    case("train_reasoning-corrupt-config-json", "--model {bad_config}", "{bad_config}",
         "incomplete or corrupt"),
    case("train_reasoning-corrupt-token-map", "--model {bad_map}", "{bad_map}/reasoning_token_map.json",
         "copy it again"),
    case("train_reasoning-model-of-a-deleted-run", "--model runs:/{deleted}/model",
         "model='runs:/{deleted}/model'", DELETED_NOTE),
    case("train_reasoning-unknown-registered-model", "--model models:/bad-input-missing/1",
         "models:/bad-input-missing/1", "check the URI"),
    # evaluate
    case("evaluate-missing-model-dir", "--model {work}/nomodel", "{work}/nomodel", "Fix the name"),
    case("evaluate-temperature-nan", "--temperature nan", "temperature=nan", "0 for greedy decoding"),
    case("evaluate-temperature-inf", "--temperature inf", "temperature=inf", "0 for greedy decoding"),
    case("evaluate-top-p-nan", "--top_p nan", "top_p=nan", "pass e.g. 0.95"),
    case("evaluate-negative-max-examples", "--max_examples -1", "max_examples=-1",
         "pass 0 to evaluate every problem"),
    case("evaluate-zero-batch-size", "--batch_size 0", "batch_size=0", "must be at least 1"),
    case("evaluate-truncated-safetensors", "--model {truncated}", "{truncated}", "pass an intact checkpoint"),
    case("evaluate-nan-weights", "--model {nan_weights}", "{nan_weights}",
         "use one of its earlier checkpoints"),
    case("evaluate-model-of-a-deleted-run", "--model runs:/{deleted}/model", "model='runs:/{deleted}/model'",
         DELETED_NOTE),
    case("evaluate-unknown-registered-model", "--model models:/bad-input-missing/1",
         "models:/bad-input-missing/1", "check the URI"),
    case("evaluate-unknown-registered-alias", "--model models:/bad-input-missing@champion",
         "models:/bad-input-missing@champion", "check the URI"),
    case("evaluate-non-utf8-source", "--data {work}/latin1.csv", "{work}/latin1.csv' is not UTF-8",
         "re-save it as UTF-8", file("latin1.csv", NON_UTF8_CSV)),
    case("evaluate-empty-source", "--data {work}/header.csv", "'header.csv' holds no rows",
         "pass a source with data", file("header.csv", HEADER_ONLY)),
    case("evaluate-missing-split", "--split validation", "data '{data}' has no validation.parquet",
         "pass the output_dir of a finished preprocess run"),
    case("evaluate-megabyte-problem", "--data {work}/huge.jsonl", "data '{work}/huge.jsonl': problem 'huge'",
         "drop it from the data", file("huge.jsonl", jsonl(HUGE_PROBLEM))),
    # analyze
    case("analyze-empty-training-run", "--training_run ''", "training_run is empty", "pass runs:/<run_id>"),
    case("analyze-missing-output-dir", "--training_run {work}/nowhere", "{work}/nowhere",
         "pass one of those"),
    case("analyze-deleted-run", "--training_run runs:/{deleted}", "training_run='runs:/{deleted}'",
         DELETED_NOTE),
    case("analyze-corrupt-run-record", "--training_run {work}", "{work}/mlflow_run.json",
         "pass runs:/<run_id> instead", file("mlflow_run.json", "{")),
    case("analyze-temperature-nan", "--training_run {work} --temperature nan", "temperature=nan",
         "pass e.g. 0.6"),
    case("analyze-zero-max-prompts", "--training_run {work} --max_prompts 0", "max_prompts=0",
         "must be at least 1"),
    case("analyze-tokens-not-json", "--training_run {work} --tokens '[1,'", "tokens='[1,'",
         "write e.g. tokens="),
    # main
    case("main-unknown-scale", "--scale huge", "scale='huge'",
         "one of demo, gpu, pretrained, ci, pretrained-ci"),
    case("main-negative-grpo-steps", "--grpo_steps -1", "grpo_steps=-1", "pass 0 for the scale's own"),
    case("main-seeds-not-integers", "--seeds a,b", "seeds='a,b'", "e.g. seeds=0,1,2"),
    case("main-repeated-seeds", "--seeds 1,1", "seeds='1,1'", "each once"),
    case("main-negative-reasoning-vocab-size", "--reasoning_vocab_size -5", "reasoning_vocab_size=-5",
         "pass 0 to copy every one"),
    case("main-empty-registered-model-name", "--registered_model_name ''", "registered_model_name is empty",
         "pass e.g. rlvr-demo"),
    # the SLURM backend's config, checked before a run or a job exists (no cluster needed)
    slurm("slurm-unknown-key", {"partiton": "debug"}, "unknown key 'partiton'", "did you mean 'partition'?"),
    slurm("slurm-zero-nodes", {"nodes": 0}, "'nodes'", "must be a positive whole number"),
    slurm("slurm-negative-gpus", {"gpus_per_node": -1}, "'gpus_per_node'", "must be a positive whole number"),
    slurm("slurm-modules-not-a-list", {"modules": "cuda"}, "'modules'",
          "must be a list of non-empty strings"),
    slurm("slurm-environment-not-an-assignment", {"environment": ["OMP_NUM_THREADS"]}, "'environment'",
          'write e.g. "OMP_NUM_THREADS=8"'),
    slurm("slurm-exports-not-a-name", {"exports": ["HF-TOKEN"]}, "'exports'", "list names like"),
    slurm("slurm-exclusive-not-a-boolean", {"exclusive": "yes"}, "'exclusive'", "must be true or false"),
    slurm("slurm-time-with-whitespace", {"time": "4 h"}, "'time'", "must not contain whitespace"),
    slurm("slurm-missing-template", {"sbatch-template": "{work}/mine.sbatch"}, "'sbatch-template'",
          "the path of your own template"),
    slurm("slurm-docker-arguments", {}, "docker arguments (-A)", "drop them from `mlflow run`",
          "-A gpus=all"),
]  # fmt: skip


def unusable_models(entry: str) -> list:
    """A reasoning model whose token map was altered or removed, and models that would run code if loaded
    naively: refused by `entry` as by the Python API (tests/test_vocab.py)."""
    size = f" --reasoning_vocab_size {MICRO_N}" if entry == "train_reasoning" else ""
    cases = [
        case(f"{entry}-pickled-weights", f"--model {{pickled}}{size}",
             "{pickled} holds its weights only as pickles (pytorch_model.bin)", "loads safetensors only"),
        case(f"{entry}-auto-map", f"--model {{auto_map}}{size}",
             "{auto_map}/config.json names code of its own", "rlvr runs no code from a model"),
    ]  # fmt: skip
    for name, (_, names) in TOKEN_MAP_CHANGES.items():
        edited = names.startswith(MAP)
        cases.append(case(
            f"{entry}-map-{name.replace('_', '-')}", f"--model {{map_{name}}}{size}",
            f"{{map_{name}}}/{names}" if edited else names,
            "copy it again from the checkpoint" if edited else f"came from into {{map_{name}}}",
        ))  # fmt: skip
    return cases


CASES += unusable_models("evaluate") + unusable_models("train_reasoning")


# --- shared inputs, built once ------------------------------------------------------------------------------
def _copy_with(source: Path, target: Path, change: Callable[[Path], None]) -> Path:
    shutil.copytree(source, target)
    change(target)
    return target


def _overwrite(name: str, text: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).write_text(text)


def _truncate(directory: Path) -> None:
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


@pytest.fixture(scope="module")
def inputs(mlflow_server, tmp_path_factory) -> dict[str, str]:
    """What the cases name: a good preprocess output and micro model, broken copies of that model, a micro
    reasoning model with altered token maps, unsafe copies of it, data
    without worked solutions, and a deleted run."""
    root = tmp_path_factory.mktemp("bad-input")
    data = root / "data"
    preprocess("synthetic:count=24", data, Options(test_size=4, instruction=""))
    no_references = root / "no-references"
    (root / "plain.jsonl").write_text(jsonl(GOOD_ROWS))
    preprocess(str(root / "plain.jsonl"), no_references, Options(test_size=2))
    model, tokenizer = load_model("micro")
    micro = save_model(model, tokenizer, root / "micro")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    nan_weights = save_model(model, tokenizer, root / "nan-weights")
    reasoning = save_model(*load_model("micro", reasoning_vocab_size=MICRO_N), root / "micro-reasoning")
    altered = {
        f"map_{name}": str(_copy_with(reasoning, root / f"map-{name}", alter))
        for name, (alter, _) in TOKEN_MAP_CHANGES.items()
    }
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT))
    client.set_terminated(run.info.run_id)
    client.delete_run(run.info.run_id)
    return {
        "data": str(data),
        "no_references": str(no_references),
        "micro": str(micro),
        "nan_weights": str(nan_weights),
        "truncated": str(_copy_with(micro, root / "truncated", _truncate)),
        "bad_config": str(_copy_with(micro, root / "bad-config", _overwrite("config.json", "{oops"))),
        "bad_map": str(_copy_with(micro, root / "bad-map", _overwrite("reasoning_token_map.json", "{}"))),
        "pickled": str(_copy_with(reasoning, root / "pickled", pickled_weights)),
        "auto_map": str(_copy_with(reasoning, root / "auto-map", remote_code)),
        "deleted": run.info.run_id,
        **altered,
    }  # fmt: skip


# --- what every case is checked for -------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its bytes ('dir' for directories)."""
    return {
        str(path.relative_to(root)): "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
    }


def running_runs(client: MlflowClient) -> set[str]:
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = client.search_runs(
        experiments, "attributes.status = 'RUNNING'", run_view_type=ViewType.ALL, max_results=50000
    )
    return {run.info.run_id for run in runs}


def model_versions(client: MlflowClient) -> set[tuple[str, str]]:
    return {(v.name, v.version) for v in client.search_model_versions(max_results=100000)}


def invoke(entry: str, args: list[str], how: str) -> tuple[int, str]:
    """(exit status, stderr) of the command; an exception that escaped click fails the test, with its
    traceback."""
    if how == PROCESS:
        done = subprocess.run([sys.executable, "-m", f"entrypoints.{entry}", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
        assert "Traceback" not in done.stdout + done.stderr, done.stderr[-3000:]
        return done.returncode, done.stderr
    if entry == "slurm":
        from mlflow.cli import cli as command

        args = ["run", str(ROOT), *args]
    else:
        command = import_module(f"entrypoints.{entry}").main
    result = CliRunner().invoke(command, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail(
            f"{entry} raised instead of exiting with one line:\n"
            + "".join(traceback.format_exception(result.exception))
        )
    assert "Traceback" not in result.output
    return result.exit_code, result.stderr


def error_line(entry: str, stderr: str) -> str:
    """The one line that reports the error: click's `Error: ...`, or `mlflow run`'s `=== ... ===`."""
    marker = "ERROR mlflow.cli: ===" if entry == "slurm" else "Error: "
    lines = [line for line in stderr.splitlines() if line.strip()]
    reported = [line for line in lines if marker in line]
    assert len(reported) == 1, stderr[-3000:]
    assert lines[-1] == reported[0], stderr[-3000:]  # nothing after it: the message is one line
    return reported[0]


@pytest.mark.parametrize("bad", CASES)
def test_bad_input_exits_with_one_line_and_leaves_nothing_behind(bad: Case, inputs, tracking_uri, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if bad.entry == "slurm":
        monkeypatch.setenv("RLVR_CACHE", str(tmp_path / "cache"))  # where the job's files would go
    if bad.make:
        bad.make(tmp_path)
    places = {**inputs, "work": str(tmp_path), "out": str(tmp_path / "out")}

    def fill(text: str) -> str:  # `{name}` placeholders; JSON braces stay
        return re.sub(r"\{(\w+)\}", lambda match: places[match[1]], text)

    args = [fill(arg) for arg in shlex.split(bad.args)]
    client = MlflowClient()
    before, running, versions = snapshot(tmp_path), running_runs(client), model_versions(client)

    status, stderr = invoke(bad.entry, args, bad.how)

    assert status != 0
    line = error_line(bad.entry, stderr)
    assert fill(bad.names) in line, line
    assert fill(bad.fix) in line, line
    assert snapshot(tmp_path) == before  # nothing half-written, an existing output_dir untouched
    assert model_versions(client) == versions
    assert running_runs(client) <= running
    assert mlflow.active_run() is None
