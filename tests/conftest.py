import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

# Tests never reach a hub: a hub id must fail at once with a clear message, not after network retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import psutil
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlvr import thoughts
from rlvr.evaluation import Scored
from rlvr.generation import Generated
from rlvr.models import load_model as rlvr_load_model
from rlvr.presets.qwen3 import qwen3_tokenizer
from rlvr.vocab import ReasoningVocab

QWEN3_N = 151646  # the reasoning_vocab_size users pass for Qwen3
ROOT = Path(__file__).resolve().parents[1]  # the project checkout


@pytest.fixture(scope="session")
def qwen_tok():
    return qwen3_tokenizer()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """A cache directory holding the smollm2-135m-instruct preset, converted once per session from the
    installed package's GGUF; tests point `RLVR_CACHE` at it."""
    from rlvr.cache import CACHE_ENV
    from rlvr.presets.smollm2 import smollm2_directory

    root = tmp_path_factory.mktemp("smollm2-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(root))
        smollm2_directory()
    return root


@pytest.fixture(scope="session")
def tiny_llama_factory(qwen_tok):
    """An untied Llama whose embedding has exactly the tokenizer's rows (no padding rows)."""

    def build(seed: int = 0) -> LlamaForCausalLM:
        config = LlamaConfig(
            vocab_size=len(qwen_tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
            bos_token_id=qwen_tok.pad_token_id,
            eos_token_id=qwen_tok.eos_token_id,
            pad_token_id=qwen_tok.pad_token_id,
        )
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()

    return build


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (sqlite store, served artifacts in a temp dir) for the whole
    session."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (root / "server.log").open("w")
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--serve-artifacts",
    ]
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(uri, server, root / "server.log")
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _wait_healthy(uri: str, server: subprocess.Popen, log_path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(
        f"mlflow server at {uri} not healthy after {timeout}s:\n{log_path.read_text()[-3000:]}"
    )


@pytest.fixture
def tracking_uri(mlflow_server, monkeypatch):
    """Point MLflow (this process and its subprocesses) at the session's server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


def kill_when(
    command: list[str],
    condition: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    env: dict[str, str] | None = None,
    cwd: Path = ROOT,
    log: Path | None = None,
) -> list[psutil.Process]:
    """Start `command` in a process group of its own and SIGKILL the whole group as soon as `condition()`
    holds, as a crash or a preempted node would: no handler runs, so nothing is closed or cleaned up.

    Fails (after killing the group) when the job ends first or `timeout` seconds pass; `what` names the
    awaited moment in that message, which ends with the tail of `log` (the job's output) when given. Returns
    the job's descendants as they were just before the kill, for tests that check none outlives it (a launcher
    such as torchrun starts its workers in sessions of their own, out of reach of the group's kill).
    """
    with open(log, "w") if log else contextlib.nullcontext(subprocess.DEVNULL) as output:
        job = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=output, stderr=output, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            while not condition():
                if job.poll() is not None:
                    tail = f":\n{log.read_text()[-3000:]}" if log else ""
                    raise AssertionError(f"the job ended (exit code {job.returncode}) before {what}{tail}")
                assert time.monotonic() < deadline, f"{what} not reached within {timeout:.0f} s"
                time.sleep(0.1)
            return psutil.Process(job.pid).children(recursive=True)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
            job.wait()


# --- helpers shared by the constraint tests -------------------------------------------------------------
THINK, END_THINK = 151667, 151668


def warm_start_micro(
    data: Path, output_dir: Path, *, max_steps: int, learning_rate: float, **settings
) -> Path:
    """Fine-tune `micro` on `data`'s worked solutions (batch 16, no checkpoints, nothing registered; other
    `WarmstartSettings` fields as given), so GRPO starts from a policy whose rewards differ within groups;
    returns the final model's directory."""
    from rlvr.sft import WarmstartSettings, warmstart

    warmstart(
        WarmstartSettings(
            model="micro",
            data=str(data),
            max_steps=max_steps,
            learning_rate=learning_rate,
            per_device_train_batch_size=16,
            save_steps=10_000,
            output_dir=str(output_dir),
            registered_model_name="",
            **settings,
        )
    )
    return output_dir / "final"


@pytest.fixture(scope="module")
def peaked_micro():
    """micro with a reasoning copy of every id, its head biased so that distributions are neither flat nor
    one-hot (the nucleus then cuts in the middle) and forbidden rows are tempting."""
    model, tokenizer = rlvr_load_model("micro", reasoning_vocab_size=325)
    vocab = model.reasoning_vocab
    generator = torch.Generator().manual_seed(0)
    bias = 3.0 * torch.randn(vocab.total_size, generator=generator)
    never = vocab.forbidden_table("cpu").all(0)
    bias[never] += 6.0
    bias[[vocab.think_start_id, vocab.think_end_id]] += 4.0
    model.get_output_embeddings().bias = torch.nn.Parameter(bias)
    return model.eval(), tokenizer


def ring_masks(batch: int, length: int, seed: int, block: int) -> torch.Tensor:
    """(batch, length) masks as the ring leaves them: each row a span that may wrap past the last column, with
    holes (left padding, stalled columns), some spans a whole block or the whole ring, one a single column
    (`block`: columns per block of the block attention)."""
    generator = torch.Generator().manual_seed(seed)
    visible = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(batch):
        span = int(torch.randint(1, length + 1, (1,), generator=generator))
        if row == 0:
            span = length
        elif row == 1:
            span = 1
        elif row == 2:
            span = block
        end = int(torch.randint(0, length, (1,), generator=generator))
        columns = (end - torch.arange(span)) % length
        visible[row, columns] = torch.rand(span, generator=generator) > 0.2
        visible[row, end] = True  # the newest column is always seen
    return visible


def bias_towards_forbidden(model, vocab: ReasoningVocab) -> None:
    """Make padding rows and control copies the likeliest tokens, reasoning ids next, and the think tags
    likely."""
    head = model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0])
    bias[vocab.base_vocab_size :] = 10.0
    bias[vocab.tokenizer_size : vocab.base_vocab_size] = 20.0
    control_copies = (
        vocab.base_vocab_size
        + torch.nonzero(
            torch.isin(torch.tensor(vocab.standard_token_ids), torch.tensor(vocab.control_token_ids))
        ).flatten()
    )
    bias[control_copies] = 20.0
    bias[THINK] = (
        22.0  # outside, likelier than </think>; inside, about as likely as all reasoning ids together
    )
    bias[END_THINK] = 20.0  # inside, closes a thought every ~15 tokens
    head.bias = torch.nn.Parameter(bias)


def prompts(tokenizer, count: int):
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {i} + {i}?"}], tokenize=False, add_generation_prompt=True
        )
        for i in range(count)
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


# --- token maps that contradict their model; directories that ask for code to be run -----------------------
MICRO_N = 325  # one reasoning copy of every micro token id, as the demo trains


def _edit_map(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def change(directory: Path) -> None:
        path = directory / "reasoning_token_map.json"
        data = json.loads(path.read_text())
        edit(data)
        path.write_text(json.dumps(data))

    return change


def _set(field: str, value, index: int | None = None) -> Callable[[Path], None]:
    """The map's `field` (or its entry `index`) set to `value`."""

    def edit(data: dict) -> None:
        if index is None:
            data[field] = value
        else:
            data[field][index] = value

    return _edit_map(edit)


def _swap_tags(data: dict) -> None:
    data["think_start_id"], data["think_end_id"] = data["think_end_id"], data["think_start_id"]


def _drop_last_row(data: dict) -> None:
    del data["standard_token_ids"][-1], data["multiplicities"][-1]


def _repeat_a_control_id(data: dict) -> None:
    data["control_token_ids"].append(data["control_token_ids"][0])


def _remove_map(directory: Path) -> None:
    (directory / "reasoning_token_map.json").unlink()


def _remove_map_and_record(directory: Path) -> None:
    _remove_map(directory)
    config = json.loads((directory / "config.json").read_text())
    del config["rlvr_reasoning_vocab_size"], config["rlvr_base_vocab_size"]
    (directory / "config.json").write_text(json.dumps(config))


MAP = "reasoning_token_map.json: "
# name: (what is done to a saved micro model with MICRO_N reasoning rows, what its one-line refusal names)
TOKEN_MAP_CHANGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "standard_id_past_the_tokenizer": (_set("standard_token_ids", 325, index=0), MAP + "standard_token_ids"),
    "negative_standard_id": (_set("standard_token_ids", -1, index=0), MAP + "standard_token_ids"),
    "tokenizer_size_of_the_base": (_set("tokenizer_size", 384), MAP + "tokenizer_size"),
    "think_tags_swapped": (_edit_map(_swap_tags), MAP + "think_start_id"),
    "control_ids_emptied": (_set("control_token_ids", []), MAP + "control_token_ids"),
    "control_id_repeated": (_edit_map(_repeat_a_control_id), MAP + "control_token_ids"),
    "base_vocab_size_changed": (_set("base_vocab_size", 383), MAP + "base_vocab_size"),
    "row_dropped": (_edit_map(_drop_last_row), MAP + "standard_token_ids"),
    "multiplicities_changed": (_set("multiplicities", 2, index=0), MAP + "multiplicities"),
    "map_removed": (_remove_map, "(rlvr_reasoning_vocab_size), but there is no reasoning_token_map.json"),
    "map_and_its_record_removed": (
        _remove_map_and_record, "709 embedding rows, more than its tokenizer's 325 ids plus padding"
    ),
}  # fmt: skip
MAP_FIX = "copy"  # every refusal says where to copy the map from


def pickled_weights(directory: Path) -> None:
    """The weights as a pickle (what an older `save_pretrained` wrote), the safetensors file gone."""
    from safetensors.torch import load_file

    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()


def remote_code(directory: Path) -> None:
    """A config that names code of the directory's own, which would leave a trace if it ever ran."""
    (directory / "modeling_evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('ran').write_text('code from the model ran')\n"
    )
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))


def scored(
    correct: bool,
    thought: int = 2,
    reasoning: int = 1,
    answer: int = 3,
    truncated: bool = False,
    lenient: bool | None = None,
) -> Scored:
    ids = list(range(thought + answer))
    structure = thoughts.Structure(
        in_thought=(True,) * thought + (False,) * answer,
        thoughts=1,
        closed=True,
        ends_inside=False,
        prefix=slice(0, 0),
        answer=slice(thought, thought + answer),
        reasoning_in_thought=reasoning,
        reasoning_in_answer=0,
    )
    generated = Generated(
        ids, "", [], "", "", closed=True, well_formed=correct, reasoning_tokens=reasoning, structure=structure
    )
    lenient = correct if lenient is None else lenient
    return Scored(generated, correct, generated.well_formed, truncated, 0 if correct else None, lenient)
