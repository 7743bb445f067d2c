"""A registered model served over REST by `mlflow models serve`, as a user would call it."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import mlflow
import pytest
from conftest import _free_port
from mlflow.tracking import MlflowClient

from rlvr import load_model, save_model
from rlvr.serving import log_model


def post(url: str, body) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture(scope="module")
def served(mlflow_server, tmp_path_factory):
    """micro with 64 reasoning rows, registered, and served on a free loopback port."""
    with pytest.MonkeyPatch.context() as patch:  # nothing leaks into later tests' environment
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        client = MlflowClient()
        experiment = client.get_experiment_by_name("serving")
        experiment_id = experiment.experiment_id if experiment else client.create_experiment("serving")
        model, tokenizer = load_model("micro", reasoning_vocab_size=64)
        directory = save_model(model, tokenizer, tmp_path_factory.mktemp("served") / "model")
        with mlflow.start_run(experiment_id=experiment_id):
            uri = log_model(directory, "served-micro", {"arm": "reasoning"})
        port = _free_port()
        log_path = tmp_path_factory.mktemp("serve-log") / "serve.log"
        with log_path.open("w") as log:
            server = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "models",
                    "serve",
                    "-m",
                    uri,
                    "--env-manager",
                    "local",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ},
            )
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_for(base, server, log_path)
            yield base, model.reasoning_vocab
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)


def _wait_for(base: str, server: subprocess.Popen, log_path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, log_path.read_text()[-3000:]
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                return
        except OSError:
            time.sleep(1)
    pytest.fail(f"the model server did not answer in {timeout} s: {log_path.read_text()[-3000:]}")


def test_prompts_in_completions_out_with_params(served):
    base, _ = served
    status, body = post(
        f"{base}/invocations",
        {
            "inputs": ["What is 2+3?", "What is 7*6?"],
            "params": {"max_new_tokens": 12, "temperature": 1.0, "seed": 1},
        },
    )
    assert status == 200, body
    rows = body["predictions"]
    assert len(rows) == 2 and set(rows[0]) == {"completion", "thought", "answer", "reasoning_tokens"}
    assert all(isinstance(row["reasoning_tokens"], int) for row in rows)
    again = post(
        f"{base}/invocations",
        {
            "inputs": ["What is 2+3?", "What is 7*6?"],
            "params": {"max_new_tokens": 12, "temperature": 1.0, "seed": 1},
        },
    )[1]
    assert again == body  # the seed makes a request repeatable
    frame = post(
        f"{base}/invocations",
        {"dataframe_records": [{"prompt": "What is 1+1?"}], "params": {"max_new_tokens": 4}},
    )
    assert frame[0] == 200 and len(frame[1]["predictions"]) == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ({"inputs": []}, "0 inputs"),
        ({"inputs": ["hi"], "params": {"max_new_tokens": "many"}}, "max_new_tokens"),
        ({"inputs": ["hi"], "params": {"max_new_tokens": 0}}, "max_new_tokens=0 must be at least 1"),
        ({"inputs": ["hi"], "params": {"temperature": -1.0}}, "temperature=-1.0 must be 0"),
        ({"inputs": ["hi"], "params": {"top_p": 1.5}}, "top_p=1.5 must be in (0, 1]"),
        ({"dataframe_records": "not records"}, ""),
    ],
)
def test_bad_requests_get_a_4xx_with_a_message_and_the_server_stays_up(served, body, message):
    base, _ = served
    status, reply = post(f"{base}/invocations", body)
    assert 400 <= status < 500, (status, reply)
    assert message in json.dumps(reply) and reply.get("message")
    assert post(f"{base}/invocations", {"inputs": ["ok?"], "params": {"max_new_tokens": 2}})[0] == 200
