"""MLproject and the click commands agree: same parameters in the same order, same defaults, every one
passed."""

import importlib
import shlex

import pytest
import yaml
from conftest import ROOT
from mlflow.projects._project_spec import load_project

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
