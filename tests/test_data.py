"""Sources -> normalised parquet: every source type, the named datasets' layouts, validation, splits,
read-back."""

import csv
import json
from dataclasses import replace
from operator import itemgetter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlvr.answers import readable_answer
from rlvr.dataset import SCHEMA, load_split
from rlvr.errors import InputError
from rlvr.preprocess import Options, last_boxed, preprocess
from rlvr.rewards import DEFAULT_INSTRUCTION

PLAIN = Options(instruction="", test_size=0)


def _write(path, rows):
    """Write `rows` (a list of dicts) in the format that `path`'s extension names."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return path


def _run(tmp_path, name, rows, options=PLAIN):
    source = _write(tmp_path / name, rows)
    result = preprocess(str(source), tmp_path / "out", options)
    return pq.read_table(result.paths["train"]).to_pylist(), result.report


def _users(rows):
    return [row["prompt"][-1]["content"] for row in rows]


# --- source types -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_file_format(tmp_path, suffix):
    rows = [{"problem": f"What is {i}+1?", "answer": str(i + 1)} for i in range(5)]
    out, report = _run(tmp_path, "toy" + suffix, rows)
    assert sorted(_users(out)) == sorted(r["problem"] for r in rows)
    assert {r["solution"] for r in out} == {"1", "2", "3", "4", "5"}
    assert {r["source"] for r in out} == {"toy" + suffix} and {r["reference"] for r in out} == {""}
    assert report.read == 5 and report.train == 5


def test_json_object_of_columns(tmp_path):
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"question": ["1+1?", "2+2?"], "answer": ["2", "4"]}))
    result = preprocess(str(path), tmp_path / "out", PLAIN)
    assert sorted(pq.read_table(result.paths["train"]).column("solution").to_pylist()) == ["2", "4"]


def test_synthetic_source_has_worked_references(tmp_path):
    result = preprocess("synthetic:count=40,max_ops=1", tmp_path, Options(test_size=10))
    train = pq.read_table(result.paths["train"]).to_pylist()
    assert len(train) == 30 and result.report.test == 10
    for row in train:
        assert row["reference"].startswith("<think>\n") and row["reference"].endswith(
            f"\\boxed{{{row['solution']}}}."
        )
        assert row["prompt"][-1]["content"].endswith(" " + DEFAULT_INSTRUCTION)
        assert row["source"] == "synthetic:count=40,max_ops=1"


def test_output_schema_is_the_contract(tmp_path):
    result = preprocess("synthetic:count=20", tmp_path, Options(system_prompt="Be brief."))
    for path in result.paths.values():
        table = pq.read_table(path)
        assert table.schema.equals(SCHEMA) and table.schema.names == [
            "id",
            "source",
            "prompt",
            "solution",
            "reference",
        ]
        prompt = table.column("prompt").to_pylist()[0]
        assert prompt[0] == {"role": "system", "content": "Be brief."} and prompt[1]["role"] == "user"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "test.parquet",
        "train.parquet",
    ]  # nothing staged is left


# --- the named datasets' layouts (rows shaped like the real ones) -------------------------------------------
def test_deepscaler(tmp_path):
    rows = [{"problem": "Find $x$ if $2x=6$.", "answer": "3", "solution": "Divide by two: $x=\\boxed{3}$."}]
    (row,), _ = _run(tmp_path, "deepscaler.jsonl", rows)
    assert (row["solution"], row["reference"]) == ("3", "Divide by two: $x=\\boxed{3}$.")
    assert _users([row]) == ["Find $x$ if $2x=6$."]


def test_deepmath(tmp_path):
    rows = [
        {
            "question": "Evaluate $\\lim_{x\\to0} \\frac{\\sin x}{x}$.",
            "final_answer": "1",
            "difficulty": 4.5,
            "topic": "Mathematics -> Calculus",
            "r1_solution_1": "Okay... so the limit is \\boxed{1}",
            "r1_solution_2": "other",
            "r1_solution_3": "other",
        }
    ]
    (row,), _ = _run(tmp_path, "deepmath.parquet", rows)
    assert (row["solution"], row["reference"]) == ("1", "Okay... so the limit is \\boxed{1}")


def test_rlvr_gsm_conversational(tmp_path):
    messages = [{"role": "user", "content": "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"}]
    rows = [{"messages": messages, "ground_truth": "7", "dataset": "gsm8k"}]
    (row,), _ = _run(tmp_path, "rlvr_gsm.jsonl", rows, Options(test_size=0, system_prompt="S"))
    assert row["prompt"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": f"{messages[0]['content']} {DEFAULT_INSTRUCTION}"},
    ]
    assert (row["solution"], row["reference"]) == ("7", "")


def test_gsm8k_answer_after_hashes(tmp_path):
    rows = [{"question": "Natalia sold 48 clips in April and half as many in May. Total?",
             "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n"
                       "Total 48+24 = <<48+24=72>>72.\n#### 72"}]  # fmt: skip
    (row,), _ = _run(tmp_path, "gsm8k.jsonl", rows)
    assert row["solution"] == "72"
    assert row["reference"] == "In May she sold 48/2 = 24 clips.\nTotal 48+24 = 72."


def test_math500_and_aime_numeric_answers(tmp_path):
    rows = [
        {"problem": "AIME: find n.", "answer": 23, "id": 60, "solution": "... \\boxed{023}", "url": "u"},
        {"problem": "MATH-500 style", "answer": "\\frac{1}{2}", "unique_id": "x", "id": 61, "solution": "s"},
        {"problem": "a float answer", "answer": 2.0, "id": 62},
        {"problem": "a real answer", "answer": 0.25, "id": 63},
    ]
    out, _ = _run(tmp_path, "aime.jsonl", rows)
    by_id = {row["id"]: row for row in out}
    assert by_id["60"]["solution"] == "23" and by_id["60"]["reference"] == "... \\boxed{023}"
    assert by_id["61"]["solution"] == "\\frac{1}{2}"
    assert (by_id["62"]["solution"], by_id["63"]["solution"]) == ("2", "0.25")


def test_math_without_answer_column_takes_last_boxed(tmp_path):
    worked = "First $\\boxed{1}$ is wrong; really it is $\\boxed{\\frac{\\sqrt{3}}{2}}$."
    rows = [
        {
            "problem": "Compute $\\sin 60^\\circ$.",
            "level": "Level 2",
            "type": "Precalculus",
            "solution": worked,
        }
    ]
    (row,), _ = _run(tmp_path, "math.jsonl", rows)
    assert (row["solution"], row["reference"]) == ("\\frac{\\sqrt{3}}{2}", worked)


def test_trl_conversational_prompt_keeps_earlier_turns(tmp_path):
    prompt = [
        {"role": "system", "content": "Own system prompt."},
        {"role": "user", "content": "Warm-up: 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": f"Now 2+2? {DEFAULT_INSTRUCTION}"},
    ]
    rows = [{"prompt": prompt, "solution": "4"}]
    (row,), _ = _run(tmp_path, "trl.jsonl", rows, Options(test_size=0, system_prompt="ignored: one exists"))
    assert row["prompt"] == prompt  # no second system prompt, no doubled instruction
    assert (row["solution"], row["reference"]) == ("4", "")


def test_explicit_field_overrides(tmp_path):
    rows = [{"q": "What is 6*7?", "gold": "42", "worked": "6*7=42", "key": "k1", "answer": "wrong column"}]
    options = Options(
        test_size=0, problem_field="q", answer_field="gold", reference_field="worked", id_field="key"
    )
    (row,), _ = _run(tmp_path, "custom.csv", rows, options)
    assert (row["id"], row["solution"], row["reference"]) == ("k1", "42", "6*7=42")
    assert _users([row]) == [f"What is 6*7? {DEFAULT_INSTRUCTION}"]


def test_own_output_reads_back_as_a_source(tmp_path):
    first = preprocess("synthetic:count=30", tmp_path / "a", Options(test_size=0))
    again = preprocess(str(first.paths["train"]), tmp_path / "b", Options(test_size=0))
    before, after = (pq.read_table(r.paths["train"]).to_pylist() for r in (first, again))
    key = itemgetter("id")
    assert [(r["id"], r["prompt"], r["solution"], r["reference"]) for r in sorted(before, key=key)] == [
        (r["id"], r["prompt"], r["solution"], r["reference"]) for r in sorted(after, key=key)
    ]


# --- validation ---------------------------------------------------------------------------------------------
def test_unusable_rows_are_dropped_and_counted(tmp_path):
    rows = [
        {"problem": "ok 1", "answer": "1"},
        {"problem": "", "answer": "1"},
        {"problem": None, "answer": "1"},
        {"problem": "no answer", "answer": None},
        {"problem": "empty answer", "answer": "  "},
        {"problem": "list answer", "answer": [1, 2]},
        {"problem": "bool answer", "answer": True},
        {"problem": "unparseable", "answer": "???"},
        {"problem": "ok 1", "answer": "1"},
        {"problem": "ok 2", "answer": "2"},
    ]
    out, report = _run(tmp_path, "mixed.jsonl", rows, replace(PLAIN, max_invalid_fraction=0.7))
    assert sorted(_users(out)) == ["ok 1", "ok 2"]
    assert report.metrics() == {
        "rows_read": 10,
        "rows_train": 2,
        "rows_test": 0,
        "rows_dropped_missing_problem": 2,
        "rows_dropped_missing_answer": 2,
        "rows_dropped_non_string_answer": 2,
        "rows_dropped_unparseable_answer": 1,
        "rows_dropped_duplicate": 1,
    }
    with pytest.raises(InputError, match="7 of 10 rows .* more than max_invalid_fraction=0.5"):
        _run(tmp_path, "mixed.jsonl", rows, replace(PLAIN, max_invalid_fraction=0.5))


def test_answers_are_checked_with_math_verify():
    assert readable_answer("\\frac{1}{2}") and readable_answer("2\\pi") and readable_answer("(1,2]")
    assert not readable_answer("√2") and not readable_answer("???") and not readable_answer("")
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None


# --- sizes, determinism -------------------------------------------------------------------------------------
def test_max_samples_and_test_size(tmp_path):
    fraction = preprocess(
        "synthetic:count=200", tmp_path / "f", Options(max_samples=100, test_size=0.25)
    ).report
    count = preprocess("synthetic:count=200", tmp_path / "c", Options(test_size=30)).report
    tiny = preprocess("synthetic:count=5", tmp_path / "t", Options(test_size=0.01)).report
    assert (fraction.train, fraction.test, count.train, count.test, tiny.test) == (75, 25, 170, 30, 1)
    with pytest.raises(InputError, match="leaving none"):
        preprocess("synthetic:count=5", tmp_path / "x", Options(test_size=5))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "options", [{"test_size": 1.5}, {"test_size": -1}, {"max_samples": -2}, {"max_invalid_fraction": 2}]
)
def test_impossible_options_are_refused(options):
    with pytest.raises(InputError):
        Options(**options)


def test_same_seed_same_bytes(tmp_path):
    rows = [{"question": f"Q{i}: what is {i}*2?", "answer": str(2 * i)} for i in range(50)]
    source = str(_write(tmp_path / "in.jsonl", rows))
    for name, source_ in (("file", source), ("synthetic", "synthetic:count=300")):
        first, again, other = (
            preprocess(source_, tmp_path / f"{name}-{copy}", Options(seed=seed, test_size=0.2)).paths
            for seed, copy in ((0, "a"), (0, "b"), (1, "c"))
        )
        for split in ("train", "test"):
            assert first[split].read_bytes() == again[split].read_bytes()
            assert first[split].read_bytes() != other[split].read_bytes()


# --- reading back -------------------------------------------------------------------------------------------
def test_load_split_from_output_dir(tmp_path):
    result = preprocess("synthetic:count=50", tmp_path, Options(test_size=10))
    split = load_split(str(tmp_path), "test")
    assert len(split.frame) == 10 and list(split.frame.columns) == SCHEMA.names
    assert split.frame["prompt"][0][0]["role"] == "user"  # plain lists of dicts, as TRL takes them
    assert split.path == result.paths["test"] and split.source_uri == str(result.paths["test"].resolve())
    assert split.name == "synthetic:count=50/test"
    assert split.digest != load_split(str(tmp_path), "train").digest
    dataset = split.mlflow_dataset()
    assert (dataset.name, dataset.digest, dataset.source.uri) == (split.name, split.digest, split.source_uri)


def test_load_split_refuses_bad_data(tmp_path):
    with pytest.raises(InputError, match="no train.parquet"):
        load_split(str(tmp_path / "missing"), "train")
    pq.write_table(pa.Table.from_pylist([{"problem": "p", "answer": "1"}]), tmp_path / "train.parquet")
    with pytest.raises(InputError, match="not the preprocess schema"):
        load_split(str(tmp_path), "train")
    (tmp_path / "test.parquet").write_text("not parquet")
    with pytest.raises(InputError, match="not readable parquet"):
        load_split(str(tmp_path), "test")
