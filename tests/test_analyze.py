"""`analyze` end to end on short real trainings of `micro`: every figure and table, checked against the
checkpoints.

One module-scoped pair of runs serves every test: a brief warm start (so GRPO sees rewards that differ and
really moves the weights), then two GRPO steps of the reasoning arm and of the baseline from it, a checkpoint
after each step.
"""

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from entrypoints.analyze import main as analyze_main
from rlvr import load_model
from rlvr.analysis.families import token_families, token_items
from rlvr.analysis.job import TAG_PREFIX
from rlvr.analysis.runs import evenly_spaced
from rlvr.dataset import load_split
from rlvr.decoding import TokenSpan
from rlvr.errors import InputError
from rlvr.generation import generate
from rlvr.grpo import TrainSettings, train
from rlvr.preprocess import Options, preprocess
from rlvr.presets.task import micro_tokenizer
from rlvr.rendering import latex_completion, markdown_completion
from rlvr.sft import WarmstartSettings, warmstart
from rlvr.vocab import ReasoningVocab

EXPERIMENT = "analyze"
# <|im_end|>'s reasoning copy is never sampled nor read, so training cannot touch its row
FAMILIES = "<|im_end|> 1 + ="
ANALYZE = ["--max_prompts", "4", "--num_samples", "2", "--max_new_tokens", "32", "--batch_size", "8",
           "--tokens", FAMILIES]  # fmt: skip
FIGURES = ["usage/usage_share.png", "usage/usage_stacked.png", "drift/cosine_drift.png",
           "drift/embedding_pca.png", "drift/embedding_pca_families.png", "entropy/entropy.png",
           "rendering/completion.png"]  # fmt: skip
TABLES = ["usage/usage.csv", "usage/usage_logged.csv", "drift/drift.csv", "drift/family_drift.csv",
          "drift/embedding_pca.csv", "entropy/entropy.csv", "entropy/entropy_by_token.csv"]  # fmt: skip


@pytest.fixture(scope="module")
def analysis(mlflow_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("analyze")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
        data = root / "data"
        preprocess("synthetic:count=150,digits=1,max_ops=1", data, Options(test_size=16, instruction=""))
        warm = root / "warm"
        warmstart(WarmstartSettings(model="micro", data=str(data), max_steps=45, learning_rate=1e-2,
                                    per_device_train_batch_size=16, save_steps=1000, output_dir=str(warm),
                                    registered_model_name=""))  # fmt: skip
        small = {"model": str(warm / "final"), "data": str(data), "max_steps": 2, "save_steps": 1,
                 "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_generations": 4,
                 "max_completion_length": 32, "learning_rate": 1e-3, "format_weight": 1.0,
                 "log_completions_steps": 0, "registered_model_name": ""}  # fmt: skip
        size = len(micro_tokenizer())  # every token has a copy, control tokens included
        train(TrainSettings(reasoning_vocab_size=size, output_dir=str(root / "reasoning"), **small))
        train(TrainSettings(reasoning_vocab_size=0, output_dir=str(root / "baseline"), **small))
        reasoning_id = json.loads((root / "reasoning" / "mlflow_run.json").read_text())["run_id"]
        result = CliRunner().invoke(
            analyze_main,
            ["--training_run", f"runs:/{reasoning_id}", "--baseline_run", str(root / "baseline"), *ANALYZE],
        )
        assert result.exit_code == 0, result.output
        analysis_id = result.output.strip().splitlines()[-1].removeprefix("analysis: runs:/")
        artifacts = Path(
            mlflow.artifacts.download_artifacts(run_id=analysis_id, dst_path=str(root / "artifacts"))
        )
        yield SimpleNamespace(
            data=data, reasoning=root / "reasoning", baseline=root / "baseline", reasoning_id=reasoning_id,
            baseline_id=json.loads((root / "baseline" / "mlflow_run.json").read_text())["run_id"],
            analysis_id=analysis_id, artifacts=artifacts,
            tables={name: pd.read_csv(artifacts / name) for name in TABLES},
        )  # fmt: skip


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name.split("-")[1]), p) for p in output_dir.glob("checkpoint-*"))


def embeddings(path: Path) -> torch.Tensor:
    weights = load_file(path / "model.safetensors")
    return weights["model.embed_tokens.weight"]  # micro ties its input and output embeddings


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        image.verify()
    with path.open("rb") as handle:
        header = handle.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_every_figure_and_table_is_logged_and_the_runs_point_at_each_other(analysis):
    client = MlflowClient()
    run = client.get_run(analysis.analysis_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["rlvr.training_run_id"] == analysis.reasoning_id
    assert run.data.tags["rlvr.baseline_run_id"] == analysis.baseline_id
    for analysed in (analysis.reasoning_id, analysis.baseline_id):
        assert (
            client.get_run(analysed).data.tags[TAG_PREFIX + analysis.analysis_id]
            == f"runs:/{analysis.analysis_id}"
        )
    assert run.data.params["steps"] == "0,1,2" and run.data.params["entropy_text"] == "references"
    assert [m.step for m in client.get_metric_history(analysis.analysis_id, "drift/tied/twin_mean")] == [
        0,
        1,
        2,
    ]
    for figure in FIGURES:
        width, height = png_size(analysis.artifacts / figure)
        assert width > 600 and height > 150, figure
    for name in ("completion.md", "completion.tex", "completion.json"):
        assert (analysis.artifacts / "rendering" / name).stat().st_size > 0


def thought_tokens_by_hand(ids: list[int], opening: int, closing: int) -> int:
    """Tokens from an opening tag through its closing tag (the prompts here never open a thought)."""
    count, inside = 0, False
    for token in ids:
        inside = inside or token == opening
        count += inside
        inside = inside and token != closing
    return count


def test_usage_is_what_the_checkpoints_sample_and_zero_for_the_baseline(analysis):
    usage = analysis.tables["usage/usage.csv"]
    baseline = usage[usage["run"] == "baseline"]
    assert list(baseline["step"]) == [0, 1, 2] and (baseline["reasoning_tokens"] == 0).all()
    assert (baseline["reasoning_share"] == 0).all() and (baseline["thought_tokens"] > 0).all()
    training = usage[usage["run"] == "training"].set_index("step")
    assert training.loc[0, "reasoning_share"] > 0.1  # at the start each copy is exactly as likely as its twin

    step, path = checkpoints(analysis.reasoning)[-1]
    model, tokenizer = load_model(str(path))
    prompts = [list(p) for p in load_split(str(analysis.data), "test").frame["prompt"][:4]]
    groups = generate(model, tokenizer, prompts, max_new_tokens=32, num_samples=2, batch_size=8, seed=0)
    samples = [g.token_ids for group in groups for g in group]
    vocab = model.reasoning_vocab
    thought = sum(thought_tokens_by_hand(ids, vocab.think_start_id, vocab.think_end_id) for ids in samples)
    assert training.loc[step, "thought_tokens"] == thought > 0
    assert training.loc[step, "reasoning_share"] == pytest.approx(
        sum(i >= vocab.base_vocab_size for ids in samples for i in ids) / thought
    )

    logged = analysis.tables["usage/usage_logged.csv"]
    for run_id in (analysis.reasoning_id, analysis.baseline_id):
        history = MlflowClient().get_metric_history(run_id, "reasoning/token_share")
        rows = logged[logged["run_id"] == run_id]
        assert list(rows["reasoning_share"]) == pytest.approx([m.value for m in history])
    assert (logged[logged["run"] == "baseline"]["reasoning_share"] == 0).all()


def test_drift_matches_the_checkpoints_and_an_untouched_row_stays_put(analysis):
    drift = analysis.tables["drift/drift.csv"]
    assert set(drift["run"]) == {"training"} and set(drift["matrix"]) == {"tied"}
    vocab = ReasoningVocab.load(analysis.reasoning / "checkpoint-0")
    base, twins = vocab.base_vocab_size, torch.tensor(vocab.standard_token_ids)
    first = embeddings(analysis.reasoning / "checkpoint-0")[base:]
    for step, path in checkpoints(analysis.reasoning):
        weight = embeddings(path)
        for measure, reference in (("twin", weight[twins]), ("start", first)):
            expected = 1 - torch.nn.functional.cosine_similarity(
                weight[base:].double(), reference.double(), dim=-1
            )
            row = drift[(drift["step"] == step) & (drift["measure"] == measure)].iloc[0]
            assert row["rows"] == vocab.size
            assert row["mean"] == pytest.approx(expected.mean().item(), abs=1e-6)
            assert row["std"] == pytest.approx(expected.std(correction=0).item(), abs=1e-6)
            assert row["max"] == pytest.approx(expected.max().item(), abs=1e-6)
            assert row["median"] == pytest.approx(expected.median().item(), abs=1e-6)
    assert (drift[drift["step"] == 0][["mean", "max"]] == 0).all().all()  # copies start identical
    assert (
        drift[(drift["step"] == 2) & (drift["measure"] == "twin")]["mean"].item() > 1e-5
    )  # training moved them

    families = analysis.tables["drift/family_drift.csv"]
    end = families[families["family"] == repr("<|im_end|>")]
    assert list(end["step"]) == [0, 1, 2] and (end["start_distance"] == 0).all()  # never sampled, never read
    last = embeddings(analysis.reasoning / "checkpoint-2")
    standard = end["standard_id"].iloc[0]
    copy_at_start = first[end["token_id"].iloc[0] - base]
    moved = 1 - torch.nn.functional.cosine_similarity(last[standard].double(), copy_at_start.double(), dim=0)
    assert end[end["step"] == 2]["twin_distance"].item() == pytest.approx(moved.item(), abs=1e-6)


def test_embedding_pca_places_identical_rows_on_one_point(analysis):
    pca = analysis.tables["drift/embedding_pca.csv"]
    assert set(pca["view"]) == {"all", "family"} and set(pca["family"]) == {repr(t) for t in FAMILIES.split()}
    assert ((pca["var_pc1"] > 0) & (pca["var_pc1"] + pca["var_pc2"] <= 1 + 1e-9)).all()
    start = pca[pca["step"] == 0]
    for (_, family), rows in start.groupby(["view", "family"]):
        # at checkpoint 0 a copy is its twin, and both runs start from the same warm start
        assert (
            rows["pc1"].max() - rows["pc1"].min() < 1e-5 and rows["pc2"].max() - rows["pc2"].min() < 1e-5
        ), family
    assert len(pca[(pca["run"] == "baseline") & (pca["multiplicity"] > 0)]) == 0


def test_entropy_matches_masked_logits_computed_by_hand(analysis):
    by_token = analysis.tables["entropy/entropy_by_token.csv"]
    assert set(by_token["run"]) == {"training", "baseline"}
    frame = load_split(str(analysis.data), "test").frame.head(4)
    for role, output_dir in (("training", analysis.reasoning), ("baseline", analysis.baseline)):
        step, path = checkpoints(output_dir)[-1]
        model, tokenizer = load_model(str(path))
        vocab = model.reasoning_vocab
        totals: dict[int, list[float]] = {}
        for messages, reference in zip(frame["prompt"], frame["reference"], strict=True):
            prompt = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            completion = tokenizer.encode(reference, add_special_tokens=False)[:32]
            ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False) + completion])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, :-1]
            # by hand: the reference's tokens from its <think> up to (not including) its </think> predict
            # inside
            prompt_length = len(ids[0]) - len(completion)
            opened = prompt_length + completion.index(vocab.think_start_id)
            closed = (
                prompt_length + completion.index(vocab.think_end_id)
                if vocab.think_end_id in completion
                else len(ids[0])
            )
            inside = torch.zeros(len(ids[0]) - 1, dtype=torch.bool)
            inside[opened:closed] = True
            entropy = torch.distributions.Categorical(logits=vocab.mask_logits(logits, inside)).entropy()
            for token, value in zip(ids[0, :-1][inside].tolist(), entropy[inside].tolist(), strict=True):
                totals.setdefault(token, []).append(value)
        rows = by_token[(by_token["run"] == role) & (by_token["step"] == step)].set_index("token_id")
        assert sorted(rows.index) == sorted(totals)
        for token, values in totals.items():
            assert rows.loc[token, "positions"] == len(values)
            assert rows.loc[token, "mean_entropy"] == pytest.approx(sum(values) / len(values), abs=1e-4)
    entropy = analysis.tables["entropy/entropy.csv"]
    assert list(entropy["step"]) == [0, 1, 2, 0, 1, 2] and (entropy["mean_entropy"] > 0).all()


def test_the_rendered_completion_is_the_sample_with_the_most_reasoning_tokens(analysis):
    record = json.loads((analysis.artifacts / "rendering" / "completion.json").read_text())
    assert record["run_id"] == analysis.reasoning_id and record["step"] == 2
    tokenizer = load_model(str(analysis.reasoning / "checkpoint-2"))[1]
    text, spans = tokenizer.decode_with_spans(record["token_ids"], skip_special_tokens=True)
    assert text == record["text"] and [list(dataclasses.astuple(s)) for s in spans] == record["spans"]
    markdown = (analysis.artifacts / "rendering" / "completion.md").read_text()
    latex = (analysis.artifacts / "rendering" / "completion.tex").read_text()
    assert record["reasoning_tokens"] > 0  # at the start a copy is as likely as its twin: samples use them
    assert "multiplicity 1" in markdown and r"\colorbox{rlvrcopy1}" in latex


def test_markdown_and_latex_keep_text_verbatim_and_colour_each_multiplicity():
    text = "<think>\n3 * 4 = 12\n\n</think>\n\n$\\boxed{12}$ & 50% #_~^"
    spans = [TokenSpan(0, 8, 0), TokenSpan(8, 10, 1), TokenSpan(10, 12, 2), TokenSpan(12, len(text), 0)]
    markdown = markdown_completion(text, spans)
    assert "<pre>&lt;think&gt;\n" in markdown and "&amp; 50% #_~^</pre>" in markdown
    assert 'background-color:#E69F00" title="reasoning token, multiplicity 1">3 </span>' in markdown
    assert 'background-color:#56B4E9" title="reasoning token, multiplicity 2">* </span>' in markdown
    latex = latex_completion(text, spans)
    assert r"\definecolor{rlvrcopy2}{HTML}{56B4E9}" in latex
    assert r"\leavevmode \colorbox{rlvrcopy1}{\strut 3\ }\colorbox{rlvrcopy2}{\strut *\ }4\ =\ 12\\" in latex
    assert r"\$\textbackslash{}boxed\{12\}\$\ \&\ 50\%\ \#\_\textasciitilde{}\textasciicircum{}" in latex
    assert "No reasoning tokens." in markdown_completion("plain", [TokenSpan(0, 5, 0)])


def test_families_default_to_the_most_frequent_tokens_and_named_tokens_must_be_single():
    tokenizer = micro_tokenizer()
    vocab = ReasoningVocab.for_tokenizer(tokenizer, 384, 2 * len(tokenizer), list(range(len(tokenizer))) * 2)
    families = token_families("", ["1+1=2\n2+2=4", "1*3=3"], tokenizer, vocab)
    assert [f.label for f in families] == ["'1'", "'2'", "'='", "'+'"]  # by count, ties by id
    one = tokenizer.convert_tokens_to_ids("1")
    assert families[0].reasoning_ids == (
        384 + one,
        384 + len(tokenizer) + one,
    )  # both copies, by multiplicity
    assert token_items('#7 + ["x"]') == [7, "+", '["x"]'] and token_items('[" the", 42]') == [" the", 42]
    named = token_families("#7 + #7", [], tokenizer, vocab)
    assert [f.standard_id for f in named] == [7, tokenizer.convert_tokens_to_ids("+")]
    with pytest.raises(InputError, match="'12' is 2 tokens, not one"):
        token_families("12", [], tokenizer, vocab)
    with pytest.raises(InputError, match="no token id of the model"):
        token_families("#999", [], tokenizer, vocab)


def test_evenly_spaced_checkpoints_keep_the_first_and_the_last():
    steps = list(range(11))
    assert evenly_spaced(steps, 0) == steps and evenly_spaced(steps, 20) == steps
    assert evenly_spaced(steps, 2) == [0, 10] and evenly_spaced(steps, 3) == [0, 5, 10]
    assert evenly_spaced(steps, 4) == [0, 3, 7, 10]


def test_mlflow_run_analyze_logs_into_the_run_it_creates(analysis, tracking_uri):
    params = ["-P", f"training_run={analysis.reasoning}", "-P", "max_checkpoints=2", "-P", "max_prompts=2",
              "-P", "num_samples=1", "-P", "max_new_tokens=16"]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "mlflow", "run", ".", "--env-manager", "local", "-e", "analyze",
         "--experiment-name", "analyze-mlflow-run", *params],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("analyze-mlflow-run").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the run `mlflow run` created, no other
    run = runs[0]
    assert run.data.params["max_checkpoints"] == "2" and run.data.params["steps"] == "0,2"
    assert run.data.tags["rlvr.training_run_id"] == analysis.reasoning_id
    assert TAG_PREFIX + run.info.run_id in client.get_run(analysis.reasoning_id).data.tags
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "drift")}
    assert {"drift/cosine_drift.png", "drift/drift.csv", "drift/embedding_pca.png"} <= logged


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--training_run", "/no/such/dir"], "is neither runs:/<run_id> nor a training output_dir"),
        (["--training_run", "runs:/0123456789abcdef0123456789abcdef"], "MLflow has no run"),
        (["--training_run", "RECORDED_ELSEWHERE"], "which does not exist here"),
        (["--training_run", "REASONING", "--max_checkpoints", "1"], "cannot show change over training"),
        (["--training_run", "REASONING", "--tokens", "12"], "'12' is 2 tokens, not one"),
        (["--training_run", "REASONING", "--data", "/no/such/data"], "/no/such/data"),
    ],
)
def test_bad_input_fails_with_one_clear_line(analysis, tracking_uri, arguments, message):
    client = MlflowClient()
    elsewhere = client.create_run(mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
    client.log_param(elsewhere.info.run_id, "output_dir", "/cluster/scratch/train_reasoning")
    client.set_terminated(elsewhere.info.run_id)
    replace = {"RECORDED_ELSEWHERE": f"runs:/{elsewhere.info.run_id}", "REASONING": str(analysis.reasoning)}
    before = len(client.search_runs([elsewhere.info.experiment_id]))
    result = CliRunner().invoke(analyze_main, [replace.get(a, a) for a in arguments])
    assert result.exit_code == 1, result.output
    assert (
        result.output.startswith("Error: ") and message in result.output and "Traceback" not in result.output
    )
    assert len(client.search_runs([elsewhere.info.experiment_id])) == before  # no analyze run was started
