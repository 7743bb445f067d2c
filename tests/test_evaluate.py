"""The `evaluate` entry point: pass@k and its interval, the HTML page, and real evaluations of a model whose
answer is known, logged to a real MLflow server and linked to the registered model."""

import itertools
import json
import math
import subprocess
import sys
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, scored
from mlflow import MlflowClient
from transformers import Qwen3Config, Qwen3ForCausalLM

from entrypoints.evaluate import main
from rlvr import load_model, save_model
from rlvr.dataset import load_split
from rlvr.decoding import TokenSpan
from rlvr.evaluation import (
    EvalSettings,
    ProblemScores,
    Scored,
    data_items,
    dataset_metrics,
    evaluate,
    length_bins,
    link_model,
    metric_label,
    model_label,
)
from rlvr.preprocess import Options, preprocess
from rlvr.presets.task import micro_tokenizer
from rlvr.protocols import pass_at_k, wilson_interval
from rlvr.rendering import PageEntry, colour_for, completions_page, segments
from rlvr.serving import log_model

FAST = {"num_samples": 2, "temperature": 1.0, "max_new_tokens": 16, "batch_size": "8"}


# --- pass@k and the interval --------------------------------------------------------------------------------
def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (the first c correct) that hold a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_equals_enumeration_over_every_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (
                    n,
                    c,
                    k,
                )


def test_pass_at_k_stays_exact_where_binomials_overflow_floats():
    assert pass_at_k(2000, 1, 1) == pytest.approx(1 / 2000)
    assert pass_at_k(2000, 0, 1000) == 0.0
    # C(2000, 1000) is about 1e600, past any float; the exact rational answer comes from Python's integers
    for c in (1, 3, 7):
        exact = 1 - Fraction(math.comb(2000 - c, 1000), math.comb(2000, 1000))
        assert pass_at_k(2000, c, 1000) == pytest.approx(float(exact), rel=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_wilson_interval_matches_the_textbook_and_stays_open_at_the_extremes():
    low, high = wilson_interval(0.5, 100)
    assert (round(low, 4), round(high, 4)) == (0.4038, 0.5962)
    assert wilson_interval(0.0, 10) == (0.0, pytest.approx(0.2775, abs=1e-4))
    low, high = wilson_interval(1.0, 4)
    assert high == 1.0 and low == pytest.approx(4 / (4 + 1.959963984540054**2))


def problem(*samples: Scored) -> ProblemScores:
    return ProblemScores(list(samples), 0 if any(s.correct for s in samples) else None)


def test_dataset_metrics_average_samples_and_problems():
    metrics = dataset_metrics(
        [
            problem(scored(True), scored(False, truncated=True, lenient=True)),
            problem(scored(False), scored(False, thought=6, reasoning=0)),
        ],
        ks=[1, 2],
    )
    assert metrics["problems"] == 2 and metrics["samples"] == 2
    assert metrics["accuracy"] == 0.25 and metrics["pass_at_1"] == 0.25
    assert metrics["pass_at_2"] == 0.5  # one problem of two was solved by some sample
    assert metrics["maj_at_1"] == 0.25  # one vote each: the correct one half of the time in problem 1
    assert metrics["maj_at_2"] == 0.5  # the wrong samples cast no vote (no answer): the correct one wins
    assert metrics["format_rate"] == 0.25 and metrics["truncation_rate"] == 0.25
    assert metrics["thought_length"] == 3.0 and metrics["answer_length"] == 3.0
    assert metrics["reasoning_share"] == 3 / 12
    for name in ("accuracy", "pass_at_2", "maj_at_2"):
        assert metrics[f"{name}_ci_low"] < metrics[name] < metrics[f"{name}_ci_high"]
    assert metrics["lenient_accuracy"] == 0.5  # the strict hit, and a final number right without a box
    assert metrics["lenient_accuracy_ci_low"] < 0.5 < metrics["lenient_accuracy_ci_high"]


@pytest.mark.parametrize(
    "name, label",
    [
        ("HuggingFaceH4/MATH-500/test", "math500"),
        ("HuggingFaceH4/aime_2024/train", "aime24"),
        ("math-ai/amc23/test", "amc23"),
        ("AIME-2025", "aime25"),
        ("sevens.jsonl", "sevens"),
        ("synthetic:count=6000,digits=1,errors=0.3/test", "synthetic"),
        ("gsm8k:main/test", "gsm8k_main"),
    ],
)
def test_benchmarks_get_short_labels(name, label, tmp_path):
    split = name.rsplit("/", 1)[1] if name.endswith(("/test", "/train")) else "test"
    assert metric_label(SimpleNamespace(name=name, split=split)) == label


def test_thought_length_bins_double_up_to_the_budget():
    assert length_bins(1024) == [0, 16, 32, 64, 128, 256, 512, 1025]
    assert length_bins(48) == [0, 16, 32, 49]


def test_data_items_keep_synthetic_options_together_and_refuse_repeats():
    assert data_items(" outputs/data, synthetic:count=20,digits=3 ,org/set") == [
        "outputs/data",
        "synthetic:count=20,digits=3",
        "org/set",
    ]
    with pytest.raises(ValueError, match="more than once"):
        data_items("a,b,a")
    with pytest.raises(ValueError, match="data is empty"):
        data_items(" , ")


# --- the HTML page ------------------------------------------------------------------------------------------
class Marks(HTMLParser):
    """The completion's text as a browser shows it, and the text inside each reasoning span with its
    colour."""

    def __init__(self):
        super().__init__()
        self.text, self.marked, self.legend = "", [], []
        self._open: list[str | None] = []
        self._in_completion = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "pre":
            self._in_completion = True
        if tag == "span":
            reasoning = attrs.get("class") == "reasoning"
            self._open.append(attrs["style"] if reasoning else None)
            if reasoning:
                self.marked.append([int(attrs["data-multiplicity"]), attrs["style"], ""])
            if attrs.get("class") == "swatch":
                self.legend.append(attrs["style"])

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_completion = False
        if tag == "span":
            self._open.pop()

    def handle_data(self, data):
        if self._in_completion:
            self.text += data
            if self._open and self._open[-1]:
                self.marked[-1][2] += data


def test_html_page_marks_exactly_the_reasoning_runs_and_escapes_the_rest():
    text = "<think>a<b & c</think>\\boxed{7}"
    spans = [TokenSpan(0, 7, 0), TokenSpan(7, 8, 1), TokenSpan(8, 10, 1), TokenSpan(10, 12, 2),
             TokenSpan(12, 14, 0), TokenSpan(14, 22, 0), TokenSpan(22, 31, 0)]  # fmt: skip
    page = completions_page("Eval <x>", [PageEntry("set · 1 · sample 0", "2 < 3?", "7", True, text, spans)])
    parsed = Marks()
    parsed.feed(page)
    assert parsed.text == text  # every character shown once, markup in the completion escaped
    expected = [
        (s.multiplicity, f"background:{colour_for(s.multiplicity)}", s.text)
        for s in segments(text, spans)
        if s.multiplicity
    ]
    assert (
        [tuple(m) for m in parsed.marked]
        == expected
        == [(1, "background:#E69F00", "a<b"), (2, "background:#56B4E9", " &")]
    )
    assert parsed.legend == [f"background:{colour_for(1)}", f"background:{colour_for(2)}"]
    assert "<title>Eval &lt;x&gt;</title>" in page and "2 &lt; 3?" in page and "<script" not in page
    assert "href=" not in page and "src=" not in page  # self-contained


def test_html_page_without_reasoning_tokens_has_no_marks():
    page = completions_page(
        "t", [PageEntry("h", "p", "1", False, "<think>x</think>1", [TokenSpan(0, 17, 0)])]
    )
    parsed = Marks()
    parsed.feed(page)
    assert parsed.marked == [] and parsed.legend == [] and "No reasoning tokens" in page


# --- real evaluations ---------------------------------------------------------------------------------------
def answer_model(root: Path, digit: str) -> Path:
    """A real Qwen3 on the micro tokenizer that answers every chat prompt with `<think>D</think>\\boxed{D}`.

    Its layers add nothing to the residual stream (zero output projections), so each next token depends on the
    last token alone; one-hot embeddings and an lm_head that maps each chain token to the next make a bigram
    chain from the generation prompt's final newline through that answer to <|im_end|>. The thought's digit is
    a reasoning copy (one row appended), so the chain's ids are all distinct and the thought holds a reasoning
    token.
    """
    tokenizer = micro_tokenizer()
    chain_length = 10
    config = Qwen3Config(
        vocab_size=384,
        hidden_size=chain_length,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    save_model(Qwen3ForCausalLM(config), tokenizer, root / "base")
    answer = tokenizer.convert_tokens_to_ids(digit)
    model, tokenizer = load_model(str(root / "base"), reasoning_vocab_size=1, standard_token_ids=[answer])
    reasoning_copy = model.reasoning_vocab.base_vocab_size
    ids = tokenizer.convert_tokens_to_ids
    boxed = ids(["\\", "boxed", "{", digit, "}"])
    chain = [ids("Ċ"), ids("<think>"), reasoning_copy, ids("</think>"), *boxed, tokenizer.eos_token_id]
    assert len(set(chain)) == len(chain) == chain_length
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        embeddings.zero_()
        head.zero_()
        for state, (token, following) in enumerate(itertools.pairwise(chain)):
            embeddings[token, state] = 1.0
            head[following, state] = 50.0
    return save_model(model, tokenizer, root / "model")


@pytest.fixture(scope="module")
def answer_7_model(tmp_path_factory) -> Path:
    return answer_model(tmp_path_factory.mktemp("answer-7"), "7")


@pytest.fixture(scope="module")
def answer_8_model(tmp_path_factory) -> Path:
    return answer_model(tmp_path_factory.mktemp("answer-8"), "8")


def write_problems(path: Path, answer: str) -> Path:
    rows = [{"problem": f"What is {a} + {b}?", "answer": answer} for a, b in ((3, 4), (2, 5), (6, 1))]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def sevens(tmp_path_factory) -> Path:
    """A raw source whose answers are all 7."""
    return write_problems(tmp_path_factory.mktemp("sevens") / "sevens.jsonl", "7")


@pytest.fixture(scope="module")
def eights(tmp_path_factory) -> Path:
    """A preprocess output whose test answers are all 8."""
    root = tmp_path_factory.mktemp("eights")
    preprocess(str(write_problems(root / "eights.jsonl", "8")), root / "data", Options(test_size=2))
    return root / "data"


@pytest.mark.parametrize("fast", ["true", "false"])
def test_evaluate_scores_a_right_and_a_wrong_dataset(
    tracking_uri, answer_7_model, sevens, eights, monkeypatch, fast, capfd
):
    experiment = f"evaluate-in-process-{fast}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    settings = EvalSettings(model=str(answer_7_model), data=f"{sevens},{eights}", fast_decoding=fast, **FAST)
    evaluation = evaluate(settings)
    results = evaluation.metrics[str(answer_7_model)]
    assert list(results) == [str(sevens), str(eights)] and evaluation.comparisons == {}
    right, wrong = results[str(sevens)], results[str(eights)]
    assert right["problems"] == 3 and wrong["problems"] == 2 and right["samples"] == 2
    for name in ("accuracy", "pass_at_1", "pass_at_2", "maj_at_1", "maj_at_2"):
        assert right[name] == 1.0 and wrong[name] == 0.0, name
        assert right[f"{name}_ci_low"] < 1.0 == right[f"{name}_ci_high"]
        assert wrong[f"{name}_ci_low"] == 0.0 < wrong[f"{name}_ci_high"]
    assert right["lenient_accuracy"] == 1.0 and wrong["lenient_accuracy"] == 0.0
    for metrics in (right, wrong):
        assert metrics["format_rate"] == 1.0 and metrics["truncation_rate"] == 0.0
        assert (
            metrics["thought_length"] == 3 and metrics["answer_length"] == 5
        )  # <think>, 7*, </think> | \boxed{7}
        assert metrics["reasoning_share"] == pytest.approx(1 / 3)
    progress = capfd.readouterr().err
    assert "5/5" in progress and "problem" in progress and "tok/s" in progress  # the bar, on stderr

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert run.info.run_id == evaluation.run_id
    assert run.info.status == "FINISHED" and run.data.tags["rlvr.model"] == str(answer_7_model)
    assert run.data.metrics["eval/sevens/accuracy"] == 1.0 and run.data.metrics["eval/eights/accuracy"] == 0.0
    assert run.data.params["num_samples"] == "2" and run.data.params["reasoning_vocab_size"] == "1"
    done = client.get_metric_history(run.info.run_id, "progress/problems_done")
    assert len(done) >= 2 and done[0].value == 0 and max(m.value for m in done) == 5  # logged while it works
    loop = {k for k in run.data.metrics if k.startswith("decode/")}  # the fast decoder's host time, by part
    assert (loop and run.data.metrics["decode/steps"] >= 5) if fast == "true" else not loop
    phases = {k: v for k, v in run.data.metrics.items() if k.startswith("time/")}  # where its seconds went
    assert set(phases) == {f"time/{p}_s" for p in ("load", "prepare", "sampling", "scoring_tail", "logging")}
    assert all(v >= 0 for v in phases.values()) and phases["time/sampling_s"] > 0
    test_split = load_split(str(eights), "test")
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
    assert inputs["eights.jsonl/test"].dataset.digest == test_split.digest  # as preprocess logged it
    assert json.loads(inputs["sevens.jsonl"].dataset.source)["uri"] == (
        f"runs:/{run.info.run_id}/data/sevens.parquet"  # the normalised raw source, kept in the run
    )
    assert {i.tags[0].value for i in inputs.values()} == {"eval"}
    table = mlflow.load_table("samples.json", run_ids=[run.info.run_id])
    assert len(table) == (3 + 2) * 2 and set(table["completion"]) == {"<think>⟦7⟧</think>\\boxed{7}"}
    assert table.groupby("dataset")["correct"].all().to_dict() == {"eights": False, "sevens": True}
    assert (table["lenient_correct"] == table["correct"]).all()  # a boxed answer: both readings agree
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lengths")}
    assert artifacts == {"lengths/accuracy_by_thought_length.png", "lengths/accuracy_by_thought_length.csv"}


def test_several_models_are_scored_on_the_same_problems_and_compared_pairwise(
    tracking_uri, answer_7_model, answer_8_model, sevens, eights, monkeypatch
):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-paired")
    sources = [str(answer_7_model), str(answer_8_model)]
    evaluation = evaluate(EvalSettings(model=",".join(sources), data=f"{sevens},{eights}", **FAST))
    assert evaluation.metrics[sources[0]][str(sevens)]["accuracy"] == 1.0
    assert evaluation.metrics[sources[1]][str(sevens)]["accuracy"] == 0.0
    assert evaluation.metrics[sources[1]][str(eights)]["accuracy"] == 1.0
    on_sevens, on_eights = (evaluation.comparisons[str(d)][sources[1]] for d in (sevens, eights))
    assert (on_sevens.diff, on_sevens.units, on_eights.diff, on_eights.units) == (-1.0, 3, 1.0, 2)
    assert on_sevens.p_value == 0.25  # all 2^3 sign patterns, two as extreme

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("evaluate-paired").experiment_id])
    (parent,) = [r for r in runs if r.info.run_id == evaluation.run_id]
    children = {
        r.data.tags["rlvr.model"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert set(children) == set(sources)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children[sources[1]].data.metrics["eval/eights/accuracy"] == 1.0  # the same keys as one model's
    key = f"compare/sevens/{model_label(sources[1])}_vs_{model_label(sources[0])}"
    assert parent.data.metrics[key] == -1.0 and parent.data.metrics[f"{key}_ci_high"] == -1.0
    assert "comparison.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}


def test_problems_are_scored_off_the_decoding_thread_and_its_errors_fail_the_run(
    tracking_uri, answer_7_model, sevens, monkeypatch
):
    """Scoring (text and answer checks) runs on a thread of its own where it is asked to (by default when
    sampling on an accelerator), so the decoder's loop never waits for it; the scores are the same, and an
    error there fails the evaluation (nothing logged as finished). On a CPU it stays on the main thread."""
    import threading

    from rlvr import evaluation

    scored_on, original = [], evaluation.score_problem

    def recording(*args, **kwargs):
        scored_on.append(threading.current_thread())
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluation, "score_problem", recording)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-scoring-thread")
    settings = EvalSettings(model=str(answer_7_model), data=str(sevens), fast_decoding="true", **FAST)
    assert evaluate(settings).metrics[str(answer_7_model)][str(sevens)]["accuracy"] == 1.0
    assert scored_on == [threading.main_thread()] * 3  # a CPU: on the decoder's thread
    scored_on.clear()
    monkeypatch.setattr(evaluation, "SCORING_THREAD", True)
    assert evaluate(settings).metrics[str(answer_7_model)][str(sevens)]["accuracy"] == 1.0
    assert len(scored_on) == 3 and threading.main_thread() not in scored_on

    def failing(*args, **kwargs):
        raise ValueError("a scoring failure")

    monkeypatch.setattr(evaluation, "score_problem", failing)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-scoring-fails")
    with pytest.raises(ValueError, match="a scoring failure"):
        evaluate(settings)
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("evaluate-scoring-fails").experiment_id])
    assert runs and all(r.info.status == "FAILED" for r in runs)
    assert not any(k.startswith("eval/") for r in runs for k in r.data.metrics)


def test_mlflow_run_evaluates_a_registered_model_and_links_both_ways(tracking_uri, answer_7_model, sevens):
    with mlflow.start_run(run_name="register-fixture") as training:
        uri = log_model(answer_7_model, "answer-7", {"arm": "reasoning"})
    client = MlflowClient()
    client.set_registered_model_alias("answer-7", "champion", uri.rsplit("/", 1)[1])
    experiment = "evaluate-mlflow-run"
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "-e", "evaluate",
         "--experiment-name", experiment, "-P", "model=models:/answer-7@champion", "-P", f"data={sevens}",
         "-P", "num_samples=2", "-P", "temperature=1.0", "-P", "max_new_tokens=16", "-P", "max_examples=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics["eval/sevens/accuracy"] == 1.0 and run.data.metrics["eval/sevens/problems"] == 2
    assert run.data.metrics["eval/sevens/pass_at_2"] == 1.0
    tags = run.data.tags
    assert (tags["rlvr.model_name"], tags["rlvr.model_version"]) == ("answer-7", "1")
    assert tags["rlvr.model_run_id"] == training.info.run_id
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.name == "sevens.jsonl"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"samples.json", "samples.html", "data", "lengths"} <= artifacts
    page = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="samples.html")).read_text()
    assert page.count('<span class="reasoning" data-multiplicity="1"') == 2 * 2
    # the registry lists the evaluation, and the logged model carries its metrics
    version = client.get_model_version("answer-7", "1")
    assert version.tags[f"rlvr.eval.{run_id}"] == "sevens: accuracy 1"
    model_id = mlflow.models.get_model_info(uri).model_id
    assert [i.model_id for i in client.get_run(run_id).inputs.model_inputs] == [model_id]
    linked = {m.key: m.value for m in client.get_logged_model(model_id).metrics if m.run_id == run_id}
    assert linked["eval/sevens/accuracy"] == 1.0
    # a runs:/ URI links to the training run and the same logged model
    link = link_model(f"runs:/{training.info.run_id}/model")
    assert link.tags["rlvr.model_run_id"] == training.info.run_id and link.model_id == model_id
    assert link.version is None


# --- the command line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_samples", "0"], "num_samples=0 must be at least 1"),
        (["--temperature", "-1"], "temperature=-1.0 is negative"),
        (["--temperature", "0"], "num_samples=1 or a positive temperature"),
        (["--top_p", "0"], "top_p=0.0 is not in (0, 1]"),
        (["--top_p", "1.5"], "top_p=1.5 is not in (0, 1]"),
        (
            ["--num_samples", "4", "--k_values", "1,8"],
            "k=8, but pass@k and maj@k need 1 <= k <= num_samples=4",
        ),
        (["--batch_size", "many"], "batch_size='many' is neither auto nor a whole number"),
        (["--data", "/no/such/dir"], "data '/no/such/dir' is no preprocess output"),
        (["--model", "no-such-org/no-such-model"], "not a preset"),
        (["--model", "micro,no-such-org/no-such-model"], "model 'no-such-org/no-such-model' is not a preset"),
        (["--max_examples", "1", "--split", "test,train"], "names 2 splits for 1 datasets"),
    ],
)
def test_bad_input_fails_with_one_clear_line(tracking_uri, sevens, args, message, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-bad-input")
    result = CliRunner().invoke(
        main, ["--model", "micro", "--data", str(sevens), "--max_new_tokens", "4", *args]
    )
    assert result.exit_code == 1, result.output
    assert (
        result.output.startswith("Error: ") and message in result.output and "Traceback" not in result.output
    )
    (line,) = [line for line in result.output.splitlines() if "Error" in line]  # MLflow adds its run links
    assert message in line
    experiment = mlflow.get_experiment_by_name("evaluate-bad-input")
    if experiment is not None:  # checks that need no model or data fail before any run starts
        assert all(r.info.status == "FAILED" for r in MlflowClient().search_runs([experiment.experiment_id]))


def test_an_empty_benchmark_is_refused_naming_it(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "evaluate-empty")
    data = tmp_path / "data"
    preprocess(str(write_problems(tmp_path / "few.jsonl", "7")), data, Options(test_size=0))  # test: no rows
    result = CliRunner().invoke(main, ["--model", "micro", "--data", str(data), "--max_new_tokens", "4"])
    assert result.exit_code == 1 and result.output.startswith("Error: ")
    assert f"data {str(data)!r} has no rows in its 'test' split" in result.output
    experiment = mlflow.get_experiment_by_name("evaluate-empty")
    assert all(r.info.status == "FAILED" for r in MlflowClient().search_runs([experiment.experiment_id]))
