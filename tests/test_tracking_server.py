"""Against an authenticated tracking server (`mlflow server --app-name basic-auth`, set up here with its
own admin, secret key and stores): credentials work from the environment, are checked before any training
and never land in a run, an artifact, a log or a SLURM job script; a server that dies mid-training stops the
training at a checkpoint, and the rerun finishes the same run with every step once.

The server starts once for the module (the outage test kills it and starts it again on the same stores).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from base64 import b64encode
from pathlib import Path
from secrets import token_hex, token_urlsafe

import mlflow
import pytest
from click.testing import CliRunner
from conftest import ROOT, _free_port, _wait_healthy
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from entrypoints.evaluate import main as evaluate_main
from entrypoints.train_baseline import main as train_main
from rlvr.preprocess import Options, preprocess
from rlvr.slurm.cluster import SlurmError
from rlvr.slurm.config import SlurmConfig

ADMIN, ADMIN_PASSWORD = f"admin-{token_hex(4)}", f"adm-{token_urlsafe(18)}"
USER, PASSWORD = f"researcher-{token_hex(4)}", f"pw-{token_urlsafe(18)}"
HF_TOKEN = f"hf_{token_hex(16)}"
SECRETS = (ADMIN_PASSWORD, PASSWORD, HF_TOKEN)
TRAIN = [  # two GRPO steps of micro in seconds on a CPU
    "--model", "micro", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
    "--num_generations", "4", "--max_completion_length", "12", "--log_completions_steps", "1",
]  # fmt: skip


class AuthServer:
    """`mlflow server --app-name basic-auth` on a loopback port; `kill` and `start` keep port and stores."""

    def __init__(self, root: Path):
        self.root = root
        self.uri = f"http://127.0.0.1:{_free_port()}"
        config = root / "basic_auth.ini"
        config.write_text(
            "[mlflow]\n"
            "default_permission = READ\n"
            f"database_uri = sqlite:///{root / 'auth.db'}\n"
            f"admin_username = {ADMIN}\n"
            f"admin_password = {ADMIN_PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 600\n"  # one password hash per login, not one per request
        )
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(config),
            MLFLOW_FLASK_SERVER_SECRET_KEY=token_hex(16),
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )  # its job workers would only cost CPU here
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
            "--port", self.uri.rsplit(":", 1)[1], "--workers", "1",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", str(self.root / "artifacts"), "--serve-artifacts",
        ]  # fmt: skip
        with (self.root / "server.log").open("a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        _wait_healthy(self.uri, self.process, self.root / "server.log")

    def kill(self) -> None:
        """As a crash would: no shutdown."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def create_user(self, username: str, password: str) -> None:
        body = json.dumps({"username": username, "password": password}).encode()
        login = b64encode(f"{ADMIN}:{ADMIN_PASSWORD}".encode()).decode()
        request = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/users/create", data=body, method="POST",
            headers={"Content-Type": "application/json", "Authorization": f"Basic {login}"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    server = AuthServer(tmp_path_factory.mktemp("auth-server"))
    server.start()
    server.create_user(USER, PASSWORD)
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.kill()


@pytest.fixture
def logged_in(auth_server, monkeypatch):
    """This process and its subprocesses talk to the server as USER, the credentials in the environment."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    return auth_server


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    preprocess("synthetic:count=60", out, Options(test_size=8, instruction=""))
    return out


def leaks(places: dict[str, bytes]) -> list[str]:
    """The places that hold a secret, by name (the secrets themselves are never shown)."""
    return [where for where, data in places.items() if any(secret.encode() in data for secret in SECRETS)]


def files_under(*roots: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for root in roots for path in root.rglob("*") if path.is_file()}


@pytest.mark.slow
@pytest.mark.parametrize(
    "username, password",
    [(USER, f"wrong-{token_urlsafe(12)}"), (None, None)],
    ids=["wrong password", "no login"],
)
def test_wrong_or_missing_credentials_fail_before_training_with_one_line(
    logged_in, data_dir, tmp_path, monkeypatch, username, password
):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "refused")
    for name, value in (("MLFLOW_TRACKING_USERNAME", username), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    output = tmp_path / "out"
    for command, args in (
        (train_main, ["--data", str(data_dir), "--output_dir", str(output), *TRAIN]),
        (evaluate_main, ["--model", "micro", "--data", str(data_dir), "--max_new_tokens", "4"]),
    ):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 1, result.output[-3000:]
        (line,) = result.output.strip().splitlines()
        assert line.startswith("Error: ") and logged_in.uri in line
        assert "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_PASSWORD" in line, line
        assert ("rejected" if password else "requires a login") in line
        assert password is None or password not in line
        assert not output.exists()  # nothing trained, nothing written
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert MlflowClient().get_experiment_by_name("refused") is None  # no run either


@pytest.mark.slow
def test_training_and_evaluation_with_credentials_leave_none_behind(
    logged_in, data_dir, tmp_path, monkeypatch, capfd
):
    """Train and register (a process of its own, as a user runs it), evaluate the registered model, render a
    SLURM job for the same shell, then search everything they wrote or said for the passwords and the hub
    token."""
    output = tmp_path / "train"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "authenticated")
    trained = subprocess.run(
        [sys.executable, "-m", "entrypoints.train_baseline", "--data", str(data_dir), "--output_dir",
         str(output), "--max_steps", "2", "--save_steps", "1", "--registered_model_name", "auth-micro",
         *TRAIN],
        cwd=ROOT, capture_output=True, timeout=600, check=False,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:].decode()
    evaluated = CliRunner().invoke(
        evaluate_main,
        [
            "--model",
            "models:/auth-micro/1",
            "--data",
            str(data_dir),
            "--num_samples",
            "1",
            "--max_new_tokens",
            "8",
            "--max_examples",
            "4",
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output[-3000:]
    jobs, script, submitted = render_slurm_job(data_dir, tmp_path, monkeypatch)
    assert "--export=ALL" in submitted["argv"]  # the credentials travel in the job's environment, by name
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"} <= set(submitted["names"])
    assert submitted["password_sha256"] == hashlib.sha256(PASSWORD.encode()).hexdigest()
    assert "#SBATCH --partition=debug" in script and "rlvr.slurm.job" in script  # the backend's own script

    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("authenticated").experiment_id])
    assert {r.data.tags.get("rlvr.step") for r in runs} >= {"train_baseline", "evaluate"} and len(runs) == 3
    version = client.get_model_version("auth-micro", "1")
    said = {f"run {run.info.run_id}": [run.info.run_name, run.data.params, run.data.tags] for run in runs}
    said["model version"] = [version.tags, version.source, version.description]
    captured = capfd.readouterr()
    places = {where: json.dumps(value).encode() for where, value in said.items()}
    places.update(
        {
            "train stdout": trained.stdout,
            "train stderr": trained.stderr,
            "evaluate output": evaluated.output.encode(),
            "this process": (captured.out + captured.err).encode(),
        }
    )
    downloads = tmp_path / "downloads"
    for run in runs:
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(downloads / run.info.run_id))
    mlflow.artifacts.download_artifacts(artifact_uri="models:/auth-micro/1", dst_path=str(downloads / "m"))
    places.update(files_under(downloads, output, jobs, logged_in.root / "artifacts"))  # and the stores
    places["tracking store"] = (logged_in.root / "mlflow.db").read_bytes()
    assert any(p.endswith("samples.html") for p in places) and any("completions/step_" in p for p in places)
    assert any(p.endswith("model.safetensors") for p in places)
    assert b"model: models:/auth-micro/1" in trained.stdout
    assert leaks({"canary": f"...{PASSWORD}...".encode()}) == ["canary"]  # the search would see one
    assert leaks(places) == []


def render_slurm_job(data_dir: Path, tmp_path: Path, monkeypatch) -> tuple[Path, str, dict]:
    """`mlflow run --backend slurm` for train_baseline from this shell, with `scontrol` and `sbatch` stand-ins
    that report what sbatch was given: the job's files are the backend's own, only the queue is missing."""
    bin_dir, report = tmp_path / "bin", tmp_path / "sbatch-report"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 'PartitionName=debug Default=YES State=UP'\n")
    (bin_dir / "sbatch").write_text(
        "#!/bin/sh\n"
        f"printf '%s\\n' \"$@\" > {report}.argv\n"
        f"env | cut -d= -f1 > {report}.names\n"
        f"printf '%s' \"$MLFLOW_TRACKING_PASSWORD\" | sha256sum | cut -d' ' -f1 > {report}.sha\n"
        "echo 4242\n"
    )
    for tool in ("scontrol", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("RLVR_CACHE", str(tmp_path / "cache"))
    submitted = mlflow.projects.run(
        str(ROOT), "train_baseline", backend="slurm", env_manager="local", experiment_name="authenticated",
        parameters={"model": "micro", "data": str(data_dir), "output_dir": str(tmp_path / "slurm-train")},
        backend_config={"partition": "debug",
                        "exports": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN"]},
        synchronous=False,
    )  # fmt: skip
    MlflowClient().set_terminated(submitted.run_id, "KILLED")  # no queue will run it
    script = submitted.files.script.read_text()
    return (
        submitted.files.root,
        script,
        {
            "argv": Path(f"{report}.argv").read_text().split(),
            "names": Path(f"{report}.names").read_text().split(),
            "password_sha256": Path(f"{report}.sha").read_text().strip(),
        },
    )


@pytest.mark.parametrize(
    "name",
    [
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_TRACKING_USERNAME",
        "HF_TOKEN",
        "AWS_SECRET_ACCESS_KEY",
    ],
)
def test_a_credential_in_the_slurm_environment_key_is_refused(name):
    with pytest.raises(SlurmError, match=f"{name} holds a credential.*list \"{name}\" under 'exports'"):
        SlurmConfig.from_backend_config({"environment": ["OMP_NUM_THREADS=8", f"{name}=x"]})
    assert SlurmConfig.from_backend_config({"environment": ["TOKENIZERS_PARALLELISM=false"]}).setup() == [
        "export TOKENIZERS_PARALLELISM=false"
    ]


@pytest.mark.slow
def test_a_server_killed_mid_training_stops_it_at_a_checkpoint_and_the_rerun_logs_every_step_once(
    logged_in, data_dir, tmp_path, monkeypatch, caplog
):
    """The server dies once step 1 is logged (and MLflow gives up at once: no retries here, where they
    would only make the test wait). Training goes on to checkpoint-3 without the server and stops there
    with one line; with the server back on its stores, the same command resumes the same run and logs what
    it held back."""
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outage")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    output = tmp_path / "train"
    args = [
        "--data",
        str(data_dir),
        "--output_dir",
        str(output),
        "--max_steps",
        "4",
        "--save_steps",
        "3",
        "--registered_model_name",
        "outage-micro",
        *TRAIN,
    ]
    killer = threading.Thread(target=kill_once_step_1_is_logged, args=(logged_in, output), daemon=True)
    killer.start()
    with caplog.at_level(logging.WARNING, logger="rlvr.tracking"):
        stopped = CliRunner().invoke(train_main, args)
    killer.join(timeout=5)
    assert stopped.exit_code == 1, stopped.output[-3000:]
    (line,) = [line for line in stopped.output.splitlines() if line.startswith("Error: ")]
    assert "stopped answering at step" in line and "stopped at checkpoint-3" in line, line
    assert "rerun the same command to resume" in line and "Traceback" not in stopped.output
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "stopped answering" in r.message]
    assert len(warned) == 1
    assert mlflow.active_run() is None
    assert json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert (output / "checkpoint-0" / "reasoning_token_map.json").exists()
    assert not (output / "checkpoint-4").exists() and not (output / "final").exists()
    kept = json.loads((output / "mlflow_unlogged.json").read_text())
    first_kept = min(r["step"] for r in kept if "metrics" in r)
    assert sorted(r["step"] for r in kept if "metrics" in r) == list(range(first_kept, 4)) and first_kept >= 2

    logged_in.start()
    client = MlflowClient()
    run_id = json.loads((output / "mlflow_run.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "learning_rate")] == list(range(1, first_kept))
    assert client.search_registered_models(filter_string="name = 'outage-micro'") == []  # none half-done

    resumed = CliRunner().invoke(train_main, args)
    assert resumed.exit_code == 0, resumed.output[-3000:]
    assert "model: models:/outage-micro/1" in resumed.output
    (run,) = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    histories = {k: sorted(m.step for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}
    assert {key: steps for key, steps in histories.items() if len(steps) != len(set(steps))} == {}
    per_step = [key for key, steps in histories.items() if 1 in steps]
    assert {"reward", "loss", "learning_rate", "reasoning/token_share"} <= set(per_step)
    assert {key: histories[key] for key in per_step if histories[key] != [1, 2, 3, 4]} == {}  # no gap
    tables = sorted(a.path for a in client.list_artifacts(run_id, "completions"))
    assert tables == [f"completions/step_{step:06d}.json" for step in range(4)]
    assert not (output / "mlflow_unlogged.json").exists()
    assert client.get_model_version("outage-micro", "1").run_id == run_id


def kill_once_step_1_is_logged(server: AuthServer, output: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    client = MlflowClient()
    while time.monotonic() < deadline:
        record = output / "mlflow_run.json"
        try:
            run_id = json.loads(record.read_text())["run_id"] if record.exists() else None
            if run_id and client.get_metric_history(run_id, "learning_rate"):
                break
        except MlflowException:
            pass  # a busy server: ask again
        time.sleep(0.2)
    server.kill()
