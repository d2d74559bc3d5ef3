"""The JSON Schema of a sweep YAML, for editors (``configs/sweep.schema.json``).

A sweep's ``train``, ``eval``, ``datasets`` and ``methods`` blocks are merged over ``configs/`` before
they are validated, so in the file every key of them is optional; the schema says which keys exist
and what they take. Regenerate with ``python -m unmix_ray.config.schema`` (a test checks it is current).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from unmix_ray.config.files import CONFIG_DIR
from unmix_ray.config.models import DatasetConfig, EvalConfig, MethodConfig, TrainConfig
from unmix_ray.config.sweep import SweepConfig

SCHEMA_PATH = CONFIG_DIR / "sweep.schema.json"


def _partial(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    schema.pop("required", None)
    return schema


def sweep_schema() -> dict[str, Any]:
    schema = SweepConfig.model_json_schema(ref_template="#/$defs/{model}")
    defs = schema.setdefault("$defs", {})
    props = schema["properties"]
    train = _partial(TrainConfig, defs)
    props["train"] = train | {"description": "Training settings of every trial (configs: TrainConfig)."}
    props["train_overrides"]["additionalProperties"] = train
    props["eval"] = _partial(EvalConfig, defs)
    props["datasets"]["additionalProperties"] = _partial(DatasetConfig, defs)
    props["methods"]["additionalProperties"] = _partial(MethodConfig, defs)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def render() -> str:
    return json.dumps(sweep_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    path = Path(argv[0]) if argv else SCHEMA_PATH
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
