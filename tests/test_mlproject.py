"""MLproject and the click commands agree: same parameters in the same order, same defaults, every one
passed. MLproject is generated from the click commands by `python -m rlvr.mlproject`."""

import importlib
import shlex

import pytest
import yaml
from click.testing import CliRunner
from conftest import ROOT
from mlflow.projects._project_spec import load_project

from rlvr import mlproject

SPEC = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]


def command_of(entry: str):
    module = shlex.split(SPEC[entry]["command"])[2]
    return importlib.import_module(module).main


def test_the_project_has_the_entry_points_users_run():
    assert {
        "main",
        "preprocess",
        "warmstart",
        "train_baseline",
        "train_reasoning",
        "evaluate",
        "analyze",
    } <= set(SPEC)


@pytest.mark.parametrize("entry", sorted(SPEC))
def test_parameters_types_and_defaults_match_the_click_options(entry):
    options = {p.name: p for p in command_of(entry).params if p.name != "help"}
    parameters = SPEC[entry]["parameters"]
    assert list(parameters) == list(options)
    for name, declared in parameters.items():
        assert declared["type"] in {"string", "float", "path", "uri"}, name
        if "default" in declared:  # without one, MLflow makes the parameter required
            default = options[name].default
            assert type(default)(declared["default"]) == default, name


@pytest.mark.parametrize("entry", sorted(SPEC))
def test_the_command_passes_every_parameter_to_its_option(entry, tmp_path):
    spec = load_project(str(ROOT)).get_entry_point(entry)
    values = {name: "x" for name, p in SPEC[entry]["parameters"].items() if "default" not in p}
    argv = shlex.split(spec.compute_command(values, storage_dir=str(tmp_path)))
    command = command_of(entry)
    context = command.make_context(entry, argv[3:])
    assert set(context.params) == set(SPEC[entry]["parameters"])


def test_the_committed_mlproject_is_the_generated_one():
    result = CliRunner().invoke(mlproject.main, ["--check"])
    assert result.exit_code == 0, result.output


def test_every_entry_point_module_is_in_the_generated_mlproject():
    modules = {p.stem for p in (ROOT / "entrypoints").glob("*.py") if p.stem != "__init__"}
    assert set(mlproject.ENTRY_POINTS) == modules


def test_check_names_the_command_that_brings_mlproject_up_to_date(tmp_path):
    stale = tmp_path / "MLproject"
    stale.write_text((ROOT / "MLproject").read_text().replace("default: 0.1}", "default: 0.2}", 1))
    result = CliRunner().invoke(mlproject.main, ["--check", "--path", str(stale)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: {stale} is out of date with entrypoints/: run `python -m rlvr.mlproject --path {stale}`"
    ]
    assert CliRunner().invoke(mlproject.main, ["--path", str(stale)]).exit_code == 0
    assert stale.read_text() == (ROOT / "MLproject").read_text()


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0",
        "1e-06",
        "false",
        "yes",
        "null",
        "~",
        "-",
        "-1",
        "@x",
        "#x",
        "a: b",
        "{x}",
        "[x]",
        "a, b",
        "it's",
        'say "hi"',
        "Let's think within \\boxed{}.",
        "two\nlines",
        "tab\there",
    ],
)
def test_a_default_reads_back_as_the_same_string(value):
    assert yaml.safe_load(f"{{type: string, default: {mlproject.yaml_string(value)}}}")["default"] == value
