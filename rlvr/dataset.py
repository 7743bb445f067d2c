"""The dataset contract: the parquet that preprocess writes and that training, evaluation and analysis read
back, with its lineage.

A preprocess output is a directory (or the `data/` artifact of the preprocess run) holding `train.parquet` and
`test.parquet` in `SCHEMA`: an `id`, the `source` it came from, the chat `prompt`, the final answer the reward
checks (`solution`) and a worked solution or "" (`reference`). The schema's metadata names the dataset and the
split. `load_split` reads a split back as a `Split` that MLflow can log as a dataset input, with the same name
and digest wherever it is read from, so the UI links the runs that wrote and read it.

It is apart from `preprocess` so that everything downstream of the parquet depends on this contract only, not
on how sources are read.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.dataset_source_registry import register_dataset_source
from mlflow.data.pandas_dataset import PandasDataset

from rlvr.errors import InputError
from rlvr.tracking.uris import is_mlflow_uri, refuse_deleted_run

DATA_ARTIFACT_PATH = "data"  # where preprocess (and evaluate, for a raw source) logs parquet files in its run

_MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("prompt", pa.list_(_MESSAGE), nullable=False),
        pa.field("solution", pa.string(), nullable=False),
        pa.field("reference", pa.string(), nullable=False),
    ]
)
_METADATA_KEY = b"rlvr.dataset"


def schema_for(name: str, split: str) -> pa.Schema:
    """`SCHEMA` naming the dataset and the split, as `load_split` reads them back."""
    return SCHEMA.with_metadata({_METADATA_KEY: json.dumps({"name": name, "split": split}).encode()})


# --- reading an output back, with lineage -------------------------------------------------------------------
class RunArtifactDatasetSource(DatasetSource):
    """A dataset stored as an artifact of an MLflow run (`runs:/<run_id>/<path>`), as preprocess logs it."""

    def __init__(self, uri: str):
        self.uri = uri

    @staticmethod
    def _get_source_type() -> str:
        return "mlflow_run_artifact"

    def load(self, dst_path: str | None = None) -> str:
        return mlflow.artifacts.download_artifacts(artifact_uri=self.uri, dst_path=dst_path)

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return isinstance(raw_source, str) and raw_source.startswith("runs:/")

    @classmethod
    def _resolve(cls, raw_source: str) -> RunArtifactDatasetSource:
        return cls(raw_source)

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.uri}

    @classmethod
    def from_dict(cls, source_dict: dict) -> RunArtifactDatasetSource:
        return cls(source_dict["uri"])


register_dataset_source(RunArtifactDatasetSource)


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a preprocess output: its rows, where it lives, and its identity for MLflow lineage.

    The digest hashes the file's bytes, so the same data shows as the same dataset in every run that reads it,
    whether from the output directory or from the preprocess run's artifacts.
    """

    name: str
    split: str
    path: Path
    source_uri: str
    digest: str
    frame: pd.DataFrame = field(repr=False)

    def require_rows(self, data: str) -> Split:
        """This split, refused (naming `data`, the input it came from) when it holds no rows."""
        if self.frame.empty:
            raise InputError(
                f"data {data!r} has no rows in its {self.split!r} split; pass another split or data with "
                "rows."
            )
        return self

    def mlflow_dataset(self) -> PandasDataset:
        """For `mlflow.log_input(dataset, context=split)`."""
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns about it
            warnings.filterwarnings(
                "ignore", message="The specified dataset source can be interpreted in multiple ways"
            )
            return mlflow.data.from_pandas(
                self.frame, source=self.source_uri, name=self.name, digest=self.digest
            )


def load_split(data: str, split: str) -> Split:
    """The `split` of a preprocess output named by its `output_dir` or a `runs:/<run_id>/<artifact_path>`
    URI."""
    path, source_uri = _locate(str(data), split)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise InputError(
            f"{source_uri!r} is not readable parquet ({error}); rerun the preprocess entry point."
        ) from error
    if not table.schema.equals(SCHEMA):
        raise InputError(
            f"{source_uri!r} has columns {table.schema.names} ({table.schema.types}), not the preprocess "
            f"schema {SCHEMA.names}; run the preprocess entry point on that data and pass its output_dir."
        )
    metadata = json.loads((table.schema.metadata or {}).get(_METADATA_KEY, b"{}"))
    frame = table.to_pandas()
    frame["prompt"] = table.column("prompt").to_pylist()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    name = f"{metadata.get('name', path.parent.name)}/{split}"
    return Split(name, split, path, source_uri, digest, frame)


def _locate(data: str, split: str) -> tuple[Path, str]:
    if is_mlflow_uri(data):
        uri = data.rstrip("/")
        if uri.startswith("runs:/") and uri.count("/") == 1:
            uri = f"{uri}/{DATA_ARTIFACT_PATH}"
        uri = f"{uri}/{split}.parquet"
        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)), uri
        except Exception as error:  # MLflow raises several types for a missing run or artifact
            refuse_deleted_run("data", data)
            raise InputError(
                f"data {data!r} has no {split}.parquet that MLflow can fetch ({type(error).__name__}: "
                f"{error}); pass the runs:/<run_id>/data URI of a finished preprocess run and check "
                "MLFLOW_TRACKING_URI."
            ) from error
    path = Path(data).expanduser() / f"{split}.parquet"
    if not path.is_file():
        raise InputError(
            f"data {data!r} has no {split}.parquet; pass the output_dir of a finished preprocess run (or its "
            "runs:/<run_id>/data URI)."
        )
    return path, str(path.resolve())
