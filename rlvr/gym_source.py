"""reasoning-gym's problem generators as a preprocess source: seeded problems from outside the project.

A source names one generator or a weighted mix, then options, as `synthetic:` does:

    reasoning_gym:gsm_symbolic
    reasoning_gym:basic_arithmetic=0.5+chain_sum=0.3+gsm_symbolic=0.2,count=5000
    reasoning_gym:basic_arithmetic+chain_sum,count=2000,basic_arithmetic.max_terms=3,chain_sum.max_digits=2

Generators are joined by `+`, each with an optional weight after `=` (default 1); `count` is how many problems
(default 5000); `<generator>.<field>=<value>` sets a field of that generator's reasoning-gym config (ints,
floats, true/false, text; a field whose default is a tuple of characters, such as `operators`, takes them
written together: `operators=+-`). The problems come from reasoning-gym's composite dataset, which picks each
problem's generator at random by weight from preprocess's `seed`, so the same source and seed always give the
same problems. Each problem keeps the generator's answer (which preprocess then checks with math-verify, like
any source's), its worked solution where the generator has one (`gsm_symbolic`'s `answer_cot`, without its
`#### answer` line) and an id `<generator>-<index>`.

reasoning-gym is optional: only this source imports it, and says how to install it when it is missing.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any

from rlvr.errors import InputError, switch

PREFIX = "reasoning_gym"
DEFAULT_COUNT = 5000
_INSTALL = "pip install reasoning-gym"
_SET_BY_SOURCE = {"seed", "size"}  # config fields that `count` and preprocess's seed set
_WORKED_SOLUTION = "answer_cot"  # the metadata key under which a generator keeps its worked solution


@dataclass(frozen=True)
class GymSpec:
    """A parsed `reasoning_gym:` source: generator weights, the problem count, each generator's config
    fields."""

    weights: dict[str, float]
    count: int = DEFAULT_COUNT
    configs: dict[str, dict[str, str]] = field(default_factory=dict)


def is_gym_source(source: str) -> bool:
    return source.startswith(PREFIX + ":")


def parse_spec(source: str) -> GymSpec:
    """The generators, weights, count and config fields written in `source` (not yet checked against
    reasoning-gym)."""
    head, *options = source.removeprefix(PREFIX + ":").split(",")
    weights: dict[str, float] = {}
    for entry in head.split("+"):
        name, sep, weight = (part.strip() for part in entry.partition("="))
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            value = -1.0
        if not name or not value >= 0 or name in weights:
            raise InputError(
                f"source {source!r}: {entry!r} is not a generator with an optional non-negative weight, "
                "named once; write e.g. reasoning_gym:basic_arithmetic=0.7+chain_sum=0.3,count=5000."
            )
        weights[name] = value
    if not sum(weights.values()) > 0:
        raise InputError(f"source {source!r}: the weights add up to 0; give at least one generator weight.")
    count, configs = DEFAULT_COUNT, {}
    for option in options:
        key, sep, value = (part.strip() for part in option.partition("="))
        generator, dot, name = key.partition(".")
        if key == "count" and value.isdigit() and int(value) > 0:
            count = int(value)
        elif sep and dot and generator in weights and name:
            configs.setdefault(generator, {})[name] = value
        else:
            raise InputError(
                f"source {source!r}: option {option!r} is neither count=<positive whole number> nor "
                "<generator>.<field>=<value> for a generator of the source (the seed is preprocess's own "
                "parameter: -P seed=...)."
            )
    return GymSpec(weights, count, configs)


def short_name(source: str) -> str:
    """The source named by its generators only, e.g. `reasoning_gym:basic_arithmetic+chain_sum`."""
    return f"{PREFIX}:{'+'.join(parse_spec(source).weights)}"


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError:
        raise InputError(
            f"the {PREFIX}: source needs the reasoning-gym package, which is not installed; run `{_INSTALL}`."
        ) from None
    return reasoning_gym


def version() -> str:
    """The installed reasoning-gym's version: the generators' code, which the problems depend on."""
    _reasoning_gym()
    return importlib.metadata.version("reasoning-gym")


def _config_value(generator: str, name: str, text: str, default: Any) -> Any:
    """`text` read as the type of the config field's default."""
    try:
        if isinstance(default, bool):
            return switch(text, auto=False)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple) and all(isinstance(d, str) and len(d) == 1 for d in default):
            return tuple(text)
        if isinstance(default, str) or default is None:
            return text
    except ValueError:
        pass
    raise InputError(
        f"{generator}.{name}={text!r} cannot be read as the type of its default {default!r}; pass a value "
        "like it (fields with other types cannot be set from a source)."
    )


def _config(generator: str, fields: dict[str, str]) -> dict[str, Any]:
    from reasoning_gym.factory import DATASETS

    if generator not in DATASETS:
        close = difflib.get_close_matches(generator, DATASETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise InputError(
            f"{generator!r} is not a reasoning-gym generator{hint}; reasoning_gym.factory.DATASETS lists the "
            f"{len(DATASETS)} there are."
        )
    defaults = {f.name: f.default for f in dataclasses.fields(DATASETS[generator][1])}
    settable = sorted(set(defaults) - _SET_BY_SOURCE)
    wrong = sorted(set(fields) - set(settable))
    if wrong:
        raise InputError(
            f"{generator} has no settable config field {wrong[0]!r}; its fields are {settable} (count and "
            "-P seed set its size and seed)."
        )
    return {name: _config_value(generator, name, text, defaults[name]) for name, text in fields.items()}


def generate_rows(source: str, seed: int) -> list[dict[str, str]]:
    """The problems of `source` as rows with `id`, `problem`, `answer` and `reference` (empty when the
    generator has no worked solution)."""
    spec = parse_spec(source)
    gym = _reasoning_gym()
    from reasoning_gym.composite import DatasetSpec

    datasets = [
        DatasetSpec(name, weight, _config(name, spec.configs.get(name, {})))
        for name, weight in spec.weights.items()
    ]
    try:
        problems = gym.create_dataset("composite", size=spec.count, seed=seed, datasets=datasets)
    except (AssertionError, ValueError, TypeError) as error:  # a config's own validation
        raise InputError(
            f"source {source!r}: reasoning-gym refused the configuration ({type(error).__name__}: {error}); "
            "change the generator fields."
        ) from error
    return [_row(entry) for entry in problems]


def _row(entry: dict[str, Any]) -> dict[str, str]:
    metadata = entry.get("metadata", {})
    worked = str(metadata.get(_WORKED_SOLUTION) or "")
    reference = (worked.rpartition("####")[0] if "####" in worked else worked).strip()
    return {
        "id": f"{metadata.get('source_dataset', PREFIX)}-{metadata.get('source_index', '')}",
        "problem": entry["question"],
        "answer": entry["answer"],
        "reference": reference,
    }
