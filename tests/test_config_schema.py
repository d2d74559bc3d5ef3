"""The JSON Schema editors use for sweep YAML is current, and the shipped sweeps conform to it."""

from __future__ import annotations

import jsonschema
import pytest
import yaml

from unmix_ray.config import CONFIG_DIR
from unmix_ray.config.schema import SCHEMA_PATH, render, sweep_schema


def test_the_committed_schema_is_current():
    assert SCHEMA_PATH.read_text() == render(), "run: python -m unmix_ray.config.schema"


@pytest.mark.parametrize("name", sorted(p.name for p in (CONFIG_DIR / "sweeps").glob("*.yaml")))
def test_shipped_sweeps_conform(name):
    jsonschema.validate(yaml.safe_load((CONFIG_DIR / "sweeps" / name).read_text()), sweep_schema())


def test_the_schema_rejects_what_validation_rejects():
    bad = {"name": "x", "grid": {"dataset": ["a"], "method": ["b"], "prob": [1.5]}, "train": {"epochz": 3}}
    errors = sorted(e.message for e in jsonschema.Draft202012Validator(sweep_schema()).iter_errors(bad))
    assert any("1.5 is greater than the maximum of 1" in e for e in errors)
    assert any("'epochz' was unexpected" in e for e in errors)
