"""Sources -> normalised parquet that training and evaluation read (`rlvr.dataset` holds that parquet's
schema and reads it back), and the preprocess entry point's job: the same, logged to an MLflow run.

A source is a hub dataset, a local `.jsonl`/`.json`/`.parquet`/`.csv` file, `synthetic`, or reasoning-gym's
generators (`reasoning_gym:...`, `rlvr.gym_source`). Each row becomes
one problem, its ground-truth final answer (`solution`, the string the reward checks) and, where the source
has one, a worked solution (`reference`). The columns holding them are detected from the names that the usual
datasets use (DeepScaleR, DeepMath-103K, RLVR-GSM, GSM8K, MATH, MATH-500, AIME, TRL's conversational
`prompt`) or named explicitly. A worked solution is never taken as the answer: where there is no answer
column, the answer is the last `\\boxed{}` of the worked solution.

Rows that cannot be rewarded (no problem, no answer, an answer math-verify cannot parse) are dropped and
counted, and so are repeats of a problem or id, which would otherwise leak between train and test. Too many
unusable rows means the mapping is wrong, so that is an error rather than a silently small dataset.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq

from rlvr import gym_source, synthetic
from rlvr.answers import readable_answer
from rlvr.dataset import DATA_ARTIFACT_PATH, load_split, schema_for
from rlvr.errors import InputError
from rlvr.rewards import DEFAULT_INSTRUCTION
from rlvr.settings import param
from rlvr.tracking.params import log_params
from rlvr.tracking.runs import entrypoint_run

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "agentica-org/DeepScaleR-Preview-Dataset"
DEFAULT_OUTPUT_DIR = "outputs/data"
FILE_FORMATS = (".jsonl", ".json", ".parquet", ".csv")
SYNTHETIC = "synthetic"
SYNTHETIC_COUNT = 5000

# Column names in the order they are tried. Beside TRL's chat columns (`prompt`, `messages`), `solution` is
# the final answer, as in TRL's datasets and in our own output; elsewhere it is a worked solution.
_PROBLEM_COLUMNS = ("problem", "question", "prompt", "messages")
_ANSWER_COLUMNS = ("answer", "final_answer", "ground_truth")
_REFERENCE_COLUMNS = ("reference", "solution", "r1_solution_1")
_ID_COLUMNS = ("id", "unique_id")
_CHAT_COLUMNS = ("prompt", "messages")

# Why a row was dropped. All but `duplicate` count against `max_invalid_fraction`.
MISSING_PROBLEM, MISSING_ANSWER = "missing_problem", "missing_answer"
NON_STRING_ANSWER, UNPARSEABLE_ANSWER, DUPLICATE = "non_string_answer", "unparseable_answer", "duplicate"
DROP_REASONS = (MISSING_PROBLEM, MISSING_ANSWER, NON_STRING_ANSWER, UNPARSEABLE_ANSWER, DUPLICATE)


@dataclass(frozen=True)
class Options:
    """Everything preprocess takes besides the source and output directory; the one home of their defaults
    and help.

    `split`, `config` and `revision` select a hub dataset. `test_size` below 1 is a fraction of the usable
    rows, from 1 up a row count, 0 no test rows. `max_samples` caps the usable rows before the split (0: all).
    Empty `*_field` values mean: detect the column from its name.
    """

    split: str = param("train", "Split of a hub dataset to read.")
    config: str = param("", "Configuration (subset) of a hub dataset, e.g. 'main' for gsm8k.")
    revision: str = param("", "Revision (branch, tag or commit) of a hub dataset.")
    test_size: float = param(
        0.1, "Held-out test rows: a fraction below 1, a row count from 1 up, 0 for none."
    )
    max_samples: int = param(0, "Keep at most this many usable rows (0: all).")
    seed: int = param(0, "Seed of the shuffle and of 'synthetic'.")
    system_prompt: str = param("", "System message put before each problem (none if empty).")
    instruction: str = param(DEFAULT_INSTRUCTION, "Appended to each problem after a space (none if empty).")
    max_invalid_fraction: float = param(
        0.1, "Fail when more than this fraction of rows lacks a problem or a parseable answer."
    )
    problem_field: str = param("", "Column holding the problem (text or chat messages).")
    answer_field: str = param("", "Column holding the final answer.")
    reference_field: str = param("", "Column holding a worked solution.")
    id_field: str = param("", "Column holding a unique row id (else a hash of the problem).")

    def __post_init__(self):
        size = self.test_size
        if not size >= 0 or (size >= 1 and not float(size).is_integer()):  # `not >= 0` refuses NaN too
            raise InputError(
                f"test_size={self.test_size} is neither a fraction in [0, 1) nor a whole row count; pass "
                "e.g. 0.1 or 500."
            )
        if self.max_samples < 0:
            raise InputError(
                f"max_samples={self.max_samples} is negative; pass 0 to keep every row, or a positive cap."
            )
        if not 0 <= self.max_invalid_fraction <= 1:
            raise InputError(
                f"max_invalid_fraction={self.max_invalid_fraction} is not in [0, 1]; pass e.g. 0.1."
            )


def _option(name: str) -> Any:
    """`Options`' field `name`, with its default and help, for `PreprocessSettings` to list in its place."""
    spec = next(spec for spec in dataclasses.fields(Options) if spec.name == name)
    return param(spec.default, spec.metadata["help"])


@dataclass
class PreprocessSettings:
    """Every parameter of the preprocess entry point, in MLproject's order: the source, the output directory
    and the `Options` (whose defaults and help stay theirs)."""

    source: str = param(
        DEFAULT_SOURCE,
        f"A hub dataset id, a local {'/'.join(FILE_FORMATS)} file, 'synthetic' with optional knobs, e.g. "
        "synthetic:count=20000,digits=3,max_ops=3 (also min_ops, operations, factor_digits, negative), or "
        "reasoning-gym generators, e.g. reasoning_gym:basic_arithmetic=0.7+chain_sum=0.3,count=5000 (also "
        "<generator>.<config field>=<value>).",
    )
    split: str = _option("split")
    config: str = _option("config")
    revision: str = _option("revision")
    output_dir: str = param(DEFAULT_OUTPUT_DIR, "Directory that receives train.parquet and test.parquet.")
    test_size: float = _option("test_size")
    max_samples: int = _option("max_samples")
    seed: int = _option("seed")
    system_prompt: str = _option("system_prompt")
    instruction: str = _option("instruction")
    max_invalid_fraction: float = _option("max_invalid_fraction")
    problem_field: str = _option("problem_field")
    answer_field: str = _option("answer_field")
    reference_field: str = _option("reference_field")
    id_field: str = _option("id_field")

    def options(self) -> Options:
        """The `Options` among these settings, checked as `Options` checks them."""
        return Options(**{spec.name: getattr(self, spec.name) for spec in dataclasses.fields(Options)})


# --- reading sources ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Table:
    """A source's column names, its rows restricted to the columns asked for (large sources stay lazy), and
    the run tags that record what else the rows depend on (a generator's version)."""

    name: str
    columns: list[str]
    rows: Callable[[Sequence[str]], list[dict]]
    tags: dict[str, str] = field(default_factory=dict)


def read_source(source: str, options: Options = Options()) -> Table:
    """The table behind `source`: `synthetic[:key=value,...]`, `reasoning_gym:...`, a local file, or a hub
    dataset id."""
    if source == SYNTHETIC or source.startswith(SYNTHETIC + ":"):
        return _synthetic_table(source, options.seed)
    if gym_source.is_gym_source(source):
        return _gym_table(source, options.seed)
    path = Path(source).expanduser()
    if path.is_file():
        return _file_table(path)
    if path.exists():
        raise InputError(
            f"source {source!r} is a directory; pass one {'/'.join(FILE_FORMATS)} file inside it."
        )
    if path.suffix.lower() in FILE_FORMATS:
        raise InputError(
            f"source file {source!r} does not exist; check the path (under `mlflow run`, relative paths "
            "start at the project directory)."
        )
    return _hub_table(source, options)


def _synthetic_table(source: str, seed: int) -> Table:
    _, _, spec = source.partition(":")
    try:
        options = dict(item.split("=", 1) for item in spec.split(",") if item)
    except ValueError:
        raise InputError(
            f"source {source!r} is malformed; write options as synthetic:digits=3,max_ops=3."
        ) from None
    count = options.pop("count", str(SYNTHETIC_COUNT))
    if not count.isdigit():
        raise InputError(f"synthetic count={count!r} is not a whole number; pass e.g. synthetic:count=2000.")
    problems = synthetic.generate(int(count), seed, synthetic.Difficulty.from_options(options))
    rows = [{"problem": p.question, "answer": p.solution, "reference": p.reference} for p in problems]
    return Table(source, ["problem", "answer", "reference"], lambda columns: rows)


def _gym_table(source: str, seed: int) -> Table:
    """Named by its generators alone (`reasoning_gym:basic_arithmetic+chain_sum`), a name short enough for
    metric keys; the whole source, weights and fields included, is the run's `source` parameter."""
    rows = gym_source.generate_rows(source, seed)
    tags = {"rlvr.reasoning_gym_version": gym_source.version()}
    return Table(
        gym_source.short_name(source), ["id", "problem", "answer", "reference"], lambda _: rows, tags
    )


def _file_table(path: Path) -> Table:
    suffix = path.suffix.lower()
    if suffix not in FILE_FORMATS:
        raise InputError(
            f"source file {str(path)!r} has an unknown extension; convert it to one of "
            f"{', '.join(FILE_FORMATS)}."
        )
    if suffix == ".parquet":
        try:
            columns = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as error:
            raise InputError(
                f"source file {str(path)!r} is not readable parquet ({error}); re-export it."
            ) from error
        return Table(
            path.name, columns, lambda selected: pq.read_table(path, columns=list(selected)).to_pylist()
        )
    try:
        records = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}[suffix](path)
    except UnicodeDecodeError as error:
        raise InputError(
            f"source file {str(path)!r} is not UTF-8 text ({error.reason} at byte {error.start}); re-save it "
            "as UTF-8."
        ) from error
    columns = list(dict.fromkeys(key for record in records for key in record))
    return Table(path.name, columns, lambda selected: records)


def _read_jsonl(path: Path) -> list[dict]:
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(
                    f"line {number} of {str(path)!r} is not JSON ({error}); fix or remove it."
                ) from error
            if not isinstance(record, dict):
                raise InputError(
                    f"line {number} of {str(path)!r} is not a JSON object; write one object per line."
                )
            records.append(record)
    return records


def _read_json(path: Path) -> list[dict]:
    """A list of objects, or an object of equal-length columns (pandas' `orient="list"`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as error:
        raise InputError(f"source file {str(path)!r} is not JSON ({error}); fix it or use .jsonl.") from error
    if (
        isinstance(data, dict)
        and all(isinstance(v, list) for v in data.values())
        and len({len(v) for v in data.values()}) <= 1
    ):
        return [dict(zip(data, values, strict=True)) for values in zip(*data.values(), strict=True)]
    if isinstance(data, list) and all(isinstance(record, dict) for record in data):
        return data
    raise InputError(
        f"source file {str(path)!r} is neither a list of objects nor an object of equal-length columns; "
        "write one of those, or one object per line as .jsonl."
    )


def _read_csv(path: Path) -> list[dict]:
    with path.open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _hub_table(source: str, options: Options) -> Table:
    import datasets

    try:
        dataset = datasets.load_dataset(
            source, options.config or None, split=options.split, revision=options.revision or None
        )
    except Exception as error:  # the hub client raises many types: offline, missing repo, config, split
        raise InputError(
            f"source {source!r} is not a local file and could not be loaded as a hub dataset "
            f"(config={options.config!r}, split={options.split!r}; {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); check the id, config and split and that "
            f"the hub is reachable, or download the data and pass a {'/'.join(FILE_FORMATS)} file."
        ) from error
    return Table(
        source, list(dataset.column_names), lambda selected: dataset.select_columns(list(selected)).to_list()
    )


# --- field mapping ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fields:
    """Which columns hold the problem, the final answer, the worked solution and the id.

    `answer=None`: the answer is the last `\\boxed{}` of `reference`. `reference`/`id` None: the source has
    none.
    """

    problem: str
    answer: str | None
    reference: str | None
    id: str | None

    @property
    def columns(self) -> list[str]:
        return [
            c for c in dict.fromkeys((self.problem, self.answer, self.reference, self.id)) if c is not None
        ]


def detect_fields(table: Table, options: Options = Options()) -> Fields:
    """The columns to use: those named in `options`, else the first conventional name present."""
    named = {
        "problem_field": options.problem_field,
        "answer_field": options.answer_field,
        "reference_field": options.reference_field,
        "id_field": options.id_field,
    }
    for parameter, column in named.items():
        if column and column not in table.columns:
            raise InputError(
                f"{parameter}={column!r} is not a column of {table.name!r} (columns: {table.columns}); name "
                "one of those."
            )
    problem = options.problem_field or _first(_PROBLEM_COLUMNS, table.columns)
    if problem is None:
        raise InputError(
            f"{table.name!r} has no problem column (looked for {list(_PROBLEM_COLUMNS)}; columns: "
            f"{table.columns}); pass problem_field=<column>."
        )
    answer = options.answer_field or _first(_ANSWER_COLUMNS, table.columns)
    if answer is None and problem in _CHAT_COLUMNS and "solution" in table.columns:
        answer = "solution"
    candidates = [c for c in _REFERENCE_COLUMNS if c != answer]
    reference = options.reference_field or _first(candidates, table.columns)
    if answer is None and reference is None:
        raise InputError(
            f"{table.name!r} has no answer column (looked for {list(_ANSWER_COLUMNS)}) and no worked "
            f"solution to take the last \\boxed{{}} from (columns: {table.columns}); pass "
            "answer_field=<column>."
        )
    return Fields(problem, answer, reference, options.id_field or _first(_ID_COLUMNS, table.columns))


def _first(names: Sequence[str], columns: Sequence[str]) -> str | None:
    return next((name for name in names if name in columns), None)


# --- one row ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One usable row before the prompt is built: earlier chat turns, the problem, its answer and worked
    solution."""

    id: str
    context: tuple[dict, ...]
    problem: str
    solution: str
    reference: str


class Dropped(Exception):
    """A row that cannot be used, with the reason counted in the report."""

    def __init__(self, reason: str, detail: Any = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for position in range(begin - 1, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[begin:position]
    return None


def _problem(value: Any) -> tuple[tuple[dict, ...], str]:
    """Earlier turns and the problem text; a chat's problem is its last user message."""
    if isinstance(value, str) and value.strip():
        return (), value.strip()
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        last_user = max((i for i, m in enumerate(value) if m["role"] == "user"), default=None)
        if last_user is not None and value[last_user]["content"].strip():
            context = tuple({"role": m["role"], "content": m["content"]} for m in value[:last_user])
            return context, value[last_user]["content"].strip()
    raise Dropped(MISSING_PROBLEM, value)


def _is_message(message: Any) -> bool:
    return (
        isinstance(message, dict)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def _answer_text(value: Any) -> tuple[str, str]:
    """The answer string, plus any worked solution it carried (GSM8K writes `steps #### answer`)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise Dropped(MISSING_ANSWER, value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise Dropped(NON_STRING_ANSWER, value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    worked, _, answer = str(value).rpartition("####")
    answer = answer.strip()
    answer = last_boxed(answer) if "\\boxed{" in answer else answer
    if not answer:
        raise Dropped(MISSING_ANSWER, value)
    return answer.strip(), _clean_gsm8k(worked)


def _clean_gsm8k(worked: str) -> str:
    """GSM8K's worked solutions carry calculator annotations like `<<48/2=24>>`; the reference drops them."""
    return re.sub(r"<<[^<>]*>>", "", worked).strip()


def to_example(row: dict, fields: Fields) -> Example:
    """One source row as an `Example`, or `Dropped` with the reason."""
    context, problem = _problem(row.get(fields.problem))
    reference = row.get(fields.reference) if fields.reference else None
    reference = reference.strip() if isinstance(reference, str) else ""
    if fields.answer is None:
        answer = last_boxed(reference)
        if answer is None or not answer.strip():
            raise Dropped(MISSING_ANSWER, reference[-80:])
        answer = answer.strip()
    else:
        answer, worked = _answer_text(row.get(fields.answer))
        reference = reference or worked
    if not readable_answer(answer):
        raise Dropped(UNPARSEABLE_ANSWER, answer)
    raw_id = row.get(fields.id) if fields.id else None
    has_id = raw_id is not None and str(raw_id).strip() != ""
    identifier = str(raw_id).strip() if has_id else hashlib.sha256(problem.encode()).hexdigest()[:16]
    return Example(identifier, context, problem, answer, reference)


def make_prompt(
    example: Example, system_prompt: str = "", instruction: str = DEFAULT_INSTRUCTION
) -> list[dict]:
    """TRL's conversational prompt: optional system prompt, earlier turns, then the problem and the
    instruction."""
    messages = list(example.context)
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system_prompt})
    content = example.problem
    if instruction and not content.endswith(instruction):
        content = f"{content} {instruction}"
    return messages + [{"role": "user", "content": content}]


# --- the whole source ---------------------------------------------------------------------------------------
@dataclass
class Report:
    """Row counts of one preprocess, logged as metrics; `examples` keeps the first dropped value per
    reason."""

    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, Any] = field(default_factory=dict)
    train: int = 0
    test: int = 0

    @property
    def invalid(self) -> int:
        return sum(n for reason, n in self.dropped.items() if reason != DUPLICATE)

    def metrics(self) -> dict[str, int]:
        counts = {"rows_read": self.read, "rows_train": self.train, "rows_test": self.test}
        counts |= {f"rows_dropped_{reason}": self.dropped[reason] for reason in DROP_REASONS}
        return counts

    def breakdown(self) -> str:
        """The counts as the preprocess entry point prints them: the totals, then a line per reason rows were
        dropped for, with an example."""
        dropped = sum(self.dropped.values())
        lines = [f"{self.read} rows read: {self.train} train, {self.test} test, {dropped} dropped"]
        lines += [
            f"  dropped ({reason}): {self.dropped[reason]}, e.g. {self.examples[reason]!r:.80}"
            for reason in DROP_REASONS
            if self.dropped[reason]
        ]
        return "\n".join(lines)

    def summary(self) -> str:
        drops = ", ".join(
            f"{reason} {n} (e.g. {self.examples[reason]!r:.80})" for reason, n in self.dropped.items() if n
        )
        return f"{self.read} rows read, {self.train} train, {self.test} test; dropped: {drops or 'none'}"


def collect(table: Table, fields: Fields) -> tuple[list[Example], Report]:
    """Usable examples in source order, first occurrence of each problem and id kept."""
    report = Report()
    examples: list[Example] = []
    seen_ids: set[str] = set()
    seen_problems: set[str] = set()
    for row in table.rows(fields.columns):
        report.read += 1
        try:
            example = to_example(row, fields)
            if example.id in seen_ids or example.problem in seen_problems:
                raise Dropped(DUPLICATE, example.id)
        except Dropped as drop:
            report.dropped[drop.reason] += 1
            report.examples.setdefault(drop.reason, drop.detail)
            continue
        seen_ids.add(example.id)
        seen_problems.add(example.problem)
        examples.append(example)
    return examples, report


def _no_rows(name: str) -> InputError:
    return InputError(f"source {name!r} holds no rows; pass a source with data.")


def _check_usable(name: str, examples: list[Example], report: Report, options: Options) -> None:
    if report.read == 0:
        raise _no_rows(name)
    if not examples:
        raise InputError(
            f"no usable rows in {name!r} ({report.summary()}); fix the field mapping (problem_field, "
            "answer_field)."
        )
    if report.invalid > options.max_invalid_fraction * report.read:
        raise InputError(
            f"{report.invalid} of {report.read} rows of {name!r} are unusable, more than "
            f"max_invalid_fraction={options.max_invalid_fraction} allows ({report.summary()}); fix the field "
            "mapping or raise max_invalid_fraction."
        )


def split_examples(examples: list[Example], options: Options) -> dict[str, list[Example]]:
    """Seeded shuffle, `max_samples` cap, then the first `test_size` rows as the test split."""
    rows = list(examples)
    random.Random(options.seed).shuffle(rows)
    if options.max_samples:
        rows = rows[: options.max_samples]
    test = options.test_size if options.test_size >= 1 else round(options.test_size * len(rows))
    test = int(max(test, 1) if options.test_size > 0 else 0)
    if test >= len(rows):
        raise InputError(
            f"test_size={options.test_size} asks for {test} test rows out of {len(rows)} usable ones, "
            "leaving none for training; lower test_size or raise max_samples."
        )
    return {"train": rows[test:], "test": rows[:test]}


def to_arrow(examples: list[Example], source: str, split: str, options: Options) -> pa.Table:
    rows = [
        {
            "id": e.id,
            "source": source,
            "prompt": make_prompt(e, options.system_prompt, options.instruction),
            "solution": e.solution,
            "reference": e.reference,
        }
        for e in examples
    ]
    return pa.Table.from_pylist(rows, schema=schema_for(source, split))


def _write_atomically(tables: dict[str, pa.Table], output_dir: Path) -> dict[str, Path]:
    """Every file staged under a temporary name, then renamed: a reader sees all new files or the old ones."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, str] = {}
    try:
        for split, table in tables.items():
            handle, staged[split] = tempfile.mkstemp(dir=output_dir, prefix=f".{split}.", suffix=".tmp")
            os.close(handle)
            pq.write_table(table, staged[split])
        paths = {split: output_dir / f"{split}.parquet" for split in tables}
        for split, temporary in staged.items():
            os.replace(temporary, paths[split])
        return paths
    finally:
        for temporary in staged.values():
            Path(temporary).unlink(missing_ok=True)


@dataclass(frozen=True)
class PreprocessResult:
    output_dir: Path
    paths: dict[str, Path]
    report: Report
    tags: dict[str, str] = field(default_factory=dict)  # the source's lineage beyond its name (`Table.tags`)


def preprocess(source: str, output_dir: str | os.PathLike, options: Options = Options()) -> PreprocessResult:
    """Write `train.parquet` and `test.parquet` for `source` into `output_dir`, only once all checks
    passed."""
    if Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise InputError(f"output_dir {str(output_dir)!r} is a file; pass a directory (created if missing).")
    table = read_source(source, options)
    if not table.columns:
        raise _no_rows(table.name)
    examples, report = collect(table, detect_fields(table, options))
    _check_usable(table.name, examples, report, options)
    splits = split_examples(examples, options)
    report.train, report.test = len(splits["train"]), len(splits["test"])
    name = f"{table.name}:{options.config}" if options.config else table.name
    tables = {split: to_arrow(rows, name, split, options) for split, rows in splits.items()}
    paths = _write_atomically(tables, Path(output_dir))
    logger.info("preprocessed %s: %s", source, report.summary())
    return PreprocessResult(Path(output_dir), paths, report, table.tags)


def log_preprocess(result: PreprocessResult, params: dict[str, Any]) -> str:
    """Log a finished preprocess into the active MLflow run; returns the `runs:/` URI that training accepts.

    `mlflow run` has already logged the parameters it was given (as typed); only the rest are logged here,
    since MLflow refuses a parameter logged twice with different spellings of one value.
    """
    run_id = mlflow.active_run().info.run_id
    log_params(params)
    mlflow.log_metrics(result.report.metrics())
    data_uri = f"runs:/{run_id}/{DATA_ARTIFACT_PATH}"
    for split, path in result.paths.items():
        mlflow.log_artifact(str(path), DATA_ARTIFACT_PATH)
        logged_split = replace(
            load_split(str(result.output_dir), split), source_uri=f"{data_uri}/{split}.parquet"
        )
        mlflow.log_input(logged_split.mlflow_dataset(), context=split)
    mlflow.set_tags({**result.tags, "rlvr.data_uri": data_uri})
    return data_uri


def run_preprocess(settings: PreprocessSettings) -> tuple[PreprocessResult, str]:
    """The preprocess entry point's job: `preprocess` in an MLflow run, logged there by `log_preprocess`.

    The options are checked inside the run, so that bad ones mark it FAILED as bad data does. Returns the
    result and the `runs:/` URI of the logged data (training accepts it as well as the output directory).
    """
    with entrypoint_run("preprocess", {"rlvr.step": "preprocess"}):
        result = preprocess(settings.source, settings.output_dir, settings.options())
        data_uri = log_preprocess(result, dataclasses.asdict(settings))
    return result, data_uri
