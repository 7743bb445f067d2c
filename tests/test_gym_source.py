"""The `reasoning_gym:` preprocess source: one generator or a weighted mix, normalised to the same parquet as
every source, with worked solutions where the generator has them, seeded, and logged with its lineage."""

import importlib.metadata
import re
import sys

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from entrypoints.preprocess import main
from rlvr.errors import InputError
from rlvr.evaluation import data_items
from rlvr.gym_source import GymSpec, generate_rows, parse_spec, short_name
from rlvr.preprocess import Options, preprocess
from rlvr.rewards import answer_is_correct

MIX = "reasoning_gym:basic_arithmetic=0.5+chain_sum=0.3+gsm_symbolic=0.2,count=120"
VERSION = importlib.metadata.version("reasoning-gym")


def test_the_source_reads_generators_weights_count_and_fields():
    assert parse_spec("reasoning_gym:gsm_symbolic") == GymSpec({"gsm_symbolic": 1.0})
    spec = parse_spec(
        "reasoning_gym:basic_arithmetic=0.7+chain_sum,count=40,chain_sum.max_terms=3,basic_arithmetic.operators=+-"
    )
    assert spec == GymSpec(
        {"basic_arithmetic": 0.7, "chain_sum": 1.0},
        40,
        {"chain_sum": {"max_terms": "3"}, "basic_arithmetic": {"operators": "+-"}},
    )
    assert short_name(MIX) == "reasoning_gym:basic_arithmetic+chain_sum+gsm_symbolic"


@pytest.mark.parametrize(
    "source, words",
    [
        ("reasoning_gym:", "is not a generator with an optional non-negative weight"),
        ("reasoning_gym:chain_sum=-1", "is not a generator with an optional non-negative weight"),
        ("reasoning_gym:chain_sum=x", "is not a generator with an optional non-negative weight"),
        ("reasoning_gym:chain_sum+chain_sum", "named once"),
        ("reasoning_gym:chain_sum=0", "the weights add up to 0"),
        ("reasoning_gym:chain_sum,count=0", "count=<positive whole number>"),
        ("reasoning_gym:chain_sum,seed=1", "-P seed="),
        ("reasoning_gym:chain_sum,basic_arithmetic.max_terms=2", "for a generator of the source"),
    ],
)
def test_malformed_sources_are_refused_with_the_fix(source, words):
    with pytest.raises(InputError, match=re.escape(words)):
        parse_spec(source)


@pytest.mark.parametrize(
    "source, words",
    [
        ("reasoning_gym:chain_sums", "did you mean chain_sum"),
        ("reasoning_gym:chain_sum,chain_sum.size=3", "no settable config field 'size'"),
        ("reasoning_gym:chain_sum,chain_sum.max_terms=two", "cannot be read as the type of its default 6"),
        ("reasoning_gym:chain_sum,chain_sum.allow_negation=maybe", "cannot be read as the type"),
        ("reasoning_gym:chain_sum,chain_sum.min_terms=5,chain_sum.max_terms=2", "refused the configuration"),
    ],
)
def test_configurations_reasoning_gym_cannot_build_are_refused(source, words):
    with pytest.raises(InputError, match=words):
        generate_rows(source, seed=0)


def test_a_mix_becomes_the_usual_parquet_with_checkable_answers_and_worked_solutions(tmp_path):
    result = preprocess(MIX, tmp_path, Options(test_size=20, seed=3))
    assert result.report.read == 120 and result.report.invalid == 0
    assert result.tags == {"rlvr.reasoning_gym_version": VERSION}
    frame = pd.concat([pd.read_parquet(tmp_path / f"{split}.parquet") for split in ("train", "test")])
    generators = frame["id"].str.rsplit("-", n=1).str[0]
    assert set(generators) == {"basic_arithmetic", "chain_sum", "gsm_symbolic"}
    assert set(frame["source"]) == {"reasoning_gym:basic_arithmetic+chain_sum+gsm_symbolic"}
    # the answers are the generators', and math-verify reads them as the right answers
    assert all(answer_is_correct(f"\\boxed{{{s}}}", s) for s in frame["solution"])
    gsm = frame[generators == "gsm_symbolic"]
    assert (gsm["reference"] != "").all() and not gsm["reference"].str.contains("####").any()
    assert (frame.loc[generators != "gsm_symbolic", "reference"] == "").all()
    rows = generate_rows(MIX, seed=3)
    worked = next(r for r in rows if r["id"].startswith("gsm_symbolic"))
    assert worked["answer"] in worked["reference"]  # the worked solution ends at the answer it states


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_problems(tmp_path):
    source = "reasoning_gym:basic_arithmetic+chain_sum,count=50,chain_sum.max_terms=2"
    preprocess(source, tmp_path / "a", Options(seed=1))
    preprocess(source, tmp_path / "b", Options(seed=1))
    preprocess(source, tmp_path / "c", Options(seed=2))
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.parquet").read_bytes() == (
            tmp_path / "b" / f"{split}.parquet"
        ).read_bytes()
    first, other = (set(pd.read_parquet(tmp_path / d / "train.parquet")["solution"]) for d in "ac")
    assert first != other


def test_generator_fields_shape_the_problems():
    rows = generate_rows("reasoning_gym:basic_arithmetic,count=30,basic_arithmetic.operators=+,"
                         "basic_arithmetic.max_terms=2,basic_arithmetic.allow_negation=false,"
                         "basic_arithmetic.allow_parentheses=false", seed=0)  # fmt: skip
    assert all(set(r["problem"]) & set("-*/()") == set() for r in rows)
    assert all(r["problem"].count("+") == 1 for r in rows)


def test_without_reasoning_gym_installed_the_source_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # what an absent package looks like to import
    with pytest.raises(InputError, match="needs the reasoning-gym package.*pip install reasoning-gym"):
        preprocess("reasoning_gym:chain_sum,count=5", tmp_path, Options())
    assert not tmp_path.joinpath("train.parquet").exists()


def test_evaluate_data_keeps_a_reasoning_gym_source_with_its_options():
    data = (
        "outputs/data,reasoning_gym:chain_sum=2+gsm_symbolic,count=6,chain_sum.max_terms=2,synthetic:count=5"
    )
    assert data_items(data) == [
        "outputs/data",
        "reasoning_gym:chain_sum=2+gsm_symbolic,count=6,chain_sum.max_terms=2",
        "synthetic:count=5",
    ]


def test_the_preprocess_run_records_the_source_and_the_generators_version(tracking_uri, tmp_path):
    source = "reasoning_gym:chain_sum=2+basic_arithmetic,count=30"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_EXPERIMENT_NAME", "preprocess-reasoning-gym")
        result = CliRunner().invoke(
            main, ["--source", source, "--output_dir", str(tmp_path), "--test_size", "5"]
        )
    assert result.exit_code == 0, result.output
    run = MlflowClient().get_run(mlflow.last_active_run().info.run_id)
    assert run.data.params["source"] == source
    assert run.data.tags["rlvr.reasoning_gym_version"] == VERSION
    assert (run.data.metrics["rows_train"], run.data.metrics["rows_test"]) == (25, 5)
    names = {d.dataset.name for d in run.inputs.dataset_inputs}
    assert names == {
        "reasoning_gym:chain_sum+basic_arithmetic/train",
        "reasoning_gym:chain_sum+basic_arithmetic/test",
    }
