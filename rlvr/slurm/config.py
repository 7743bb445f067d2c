"""The backend config (`--backend-config slurm.json`): the keys mlflow-slurm users already write, checked at
once.

Every mistake found here stops `mlflow run` before a run is created or a job queued, with one sentence naming
the key and the fix; the rest (gres that the partition lacks, an account you may not use) is SLURM's to judge
at submission.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from mlflow.projects.utils import (
    PROJECT_BUILD_IMAGE,
    PROJECT_DOCKER_ARGS,
    PROJECT_DOCKER_AUTH,
    PROJECT_ENV_MANAGER,
    PROJECT_STORAGE_DIR,
    PROJECT_SYNCHRONOUS,
)

from rlvr.slurm.cluster import SlurmError

# Keys that `mlflow run` itself adds to every backend config; they describe the run, not the job.
MLFLOW_KEYS = frozenset(
    {
        PROJECT_ENV_MANAGER,
        PROJECT_SYNCHRONOUS,
        PROJECT_DOCKER_ARGS,
        PROJECT_STORAGE_DIR,
        PROJECT_BUILD_IMAGE,
        PROJECT_DOCKER_AUTH,
    }
)
TEMPLATES = ("default", "accelerate")

_WORDS = ("partition", "account", "gres", "mem", "time")  # one sbatch value each, no whitespace
_COUNTS = ("gpus_per_node", "nodes", "ntasks")
_LISTS = ("modules", "environment", "exports")
KEYS = frozenset({*_WORDS, *_COUNTS, *_LISTS, "exclusive", "sbatch-script-file", "sbatch-template"})

_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Names of credentials, which 'environment' would write into the job script: they travel by name ('exports').
_CREDENTIAL = re.compile(
    r"(^|_)(PASSWORD|PASSWD|TOKEN|SECRET|CREDENTIALS?|API_KEY)(_|$)|^MLFLOW_TRACKING_USERNAME$", re.IGNORECASE
)


@dataclass(frozen=True)
class SlurmConfig:
    """One job's SLURM request. `ntasks` is tasks per node, as mlflow-slurm defines it."""

    partition: str | None = None
    account: str | None = None
    gres: str | None = None
    mem: str | None = None
    time: str | None = None
    gpus_per_node: int | None = None
    nodes: int | None = None
    ntasks: int | None = None
    exclusive: bool = False
    modules: tuple[str, ...] = ()
    environment: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()
    script_file: Path | None = None
    template: str = "default"

    @classmethod
    def from_backend_config(cls, backend_config: Mapping[str, Any]) -> SlurmConfig:
        """Validate what `mlflow run` passes as backend config: the user's keys plus MLflow's own."""
        unknown = sorted(set(backend_config) - KEYS - MLFLOW_KEYS)
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise SlurmError(
                f"backend config: unknown key {key!r}; {hint}the SLURM backend takes "
                f"{', '.join(sorted(KEYS))}."
            )
        if backend_config.get(PROJECT_DOCKER_ARGS):
            raise SlurmError(
                "docker arguments (-A) do not apply to the SLURM backend; drop them from `mlflow run`."
            )
        values: dict[str, Any] = {}
        for key in _WORDS:
            if backend_config.get(key) is not None:
                values[key] = _word(key, backend_config[key])
        for key in _COUNTS:
            if backend_config.get(key) is not None:
                values[key] = _count(key, backend_config[key])
        for key in _LISTS:
            if backend_config.get(key) is not None:
                values[key] = _lines(key, backend_config[key])
        for entry in values.get("environment", ()):
            if not _ASSIGNMENT.match(entry):
                raise SlurmError(
                    f"backend config 'environment': {entry!r} is not a NAME=value assignment; write e.g. "
                    '"OMP_NUM_THREADS=8".'
                )
            name = entry.split("=", 1)[0]
            if _CREDENTIAL.search(name):
                raise SlurmError(
                    f"backend config 'environment': {name} holds a credential, which would be written into "
                    f"the job script; export it in your shell and list \"{name}\" under 'exports' instead."
                )
        for name in values.get("exports", ()):
            if not _NAME.fullmatch(name):
                raise SlurmError(
                    f"backend config 'exports': {name!r} is not a variable name; list names like "
                    '"HF_TOKEN".'
                )
        if backend_config.get("exclusive") is not None:
            if not isinstance(backend_config["exclusive"], bool):
                raise SlurmError("backend config 'exclusive' must be true or false.")
            values["exclusive"] = backend_config["exclusive"]
        if backend_config.get("sbatch-script-file"):
            values["script_file"] = Path(_word("sbatch-script-file", backend_config["sbatch-script-file"]))
        if backend_config.get("sbatch-template"):
            values["template"] = _template(backend_config["sbatch-template"])
        return cls(**values)

    def check_environment(self, environ: Mapping[str, str], partitions: Mapping[str, bool]) -> None:
        """Fail now for what would only fail in the queue: a partition the cluster lacks or needs, a missing
        export.

        `partitions` maps each partition of the cluster to whether it is the default one.
        """
        if self.partition is not None and self.partition not in partitions:
            raise SlurmError(
                f"backend config 'partition': this cluster has no partition {self.partition!r}; use one of "
                f"{', '.join(sorted(partitions))}."
            )
        if self.partition is None and not any(partitions.values()) and not environ.get("SBATCH_PARTITION"):
            raise SlurmError(
                "backend config has no 'partition' and this cluster has no default partition; add "
                f'"partition": one of {", ".join(sorted(partitions))}.'
            )
        missing = [name for name in self.exports if name not in environ]
        if missing:
            raise SlurmError(
                f"backend config 'exports' names {', '.join(missing)}, which this shell does not set; export "
                "each before `mlflow run`, or remove it from 'exports'."
            )

    def directives(self) -> list[str]:
        """The `#SBATCH` lines for what this config requests (job name and output are the backend's)."""
        options = {
            "partition": self.partition,
            "account": self.account,
            "gres": self.gres,
            "gpus-per-node": self.gpus_per_node,
            "mem": self.mem,
            "time": self.time,
            "nodes": self.nodes,
            "ntasks-per-node": self.ntasks,
        }
        lines = [f"#SBATCH --{name}={value}" for name, value in options.items() if value is not None]
        if self.exclusive:
            lines.append("#SBATCH --exclusive")
        return lines

    def setup(self) -> list[str]:
        """Shell lines that prepare the job's environment before the run starts: modules, then variables."""
        return [f"module load {module}" for module in self.modules] + [
            f"export {entry}" for entry in self.environment
        ]

    def template_text(self) -> str:
        if self.template in TEMPLATES:
            return resources.files("rlvr.slurm").joinpath("templates", f"{self.template}.sbatch").read_text()
        return Path(self.template).read_text()


def _word(key: str, value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise SlurmError(f"backend config {key!r} must be a non-empty string, got {value!r}.")
    text = str(value)
    if any(char.isspace() for char in text):
        raise SlurmError(f"backend config {key!r} must not contain whitespace, got {text!r}.")
    return text


def _count(key: str, value: Any) -> int:
    text = str(value)
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not text.isdigit() or int(text) < 1:
        raise SlurmError(f"backend config {key!r} must be a positive whole number, got {value!r}.")
    return int(text)


def _lines(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        raise SlurmError(
            f'backend config {key!r} must be a list of non-empty strings, e.g. "{key}": ["..."].'
        )
    if any("\n" in item for item in value):
        raise SlurmError(f"backend config {key!r}: one entry per line, without newlines inside entries.")
    return tuple(item.strip() for item in value)


def _template(value: Any) -> str:
    if value in TEMPLATES:
        return value
    if isinstance(value, str) and Path(value).is_file():
        return str(Path(value).resolve())
    raise SlurmError(
        f"backend config 'sbatch-template': {value!r} is neither a built-in template "
        f"({', '.join(TEMPLATES)}) nor a file; name one of those or the path of your own template."
    )
