"""The lean botocore models the Lambda reads (chalicelib/adapters/aws_models.py), generated from the IAM policy's
actions."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from botocore.loaders import create_loader

from chalicelib.adapters.aws_models import MODELS_DIR


def operations(actions: list[str]) -> dict[str, list[str]]:
    """{botocore service name: [operation]} from IAM action names (for these services they are the API's)."""
    found: dict[str, list[str]] = {}
    for action in actions:
        service, operation = action.split(":")
        if service in ("dynamodb", "iot", "ssm"):
            found.setdefault(service, []).append(operation)
    return {service: sorted(ops) for service, ops in sorted(found.items())}


def _shape_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "shape" and isinstance(value, str):
                yield value
            else:
                yield from _shape_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _shape_refs(value)


def _without_docs(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_docs(v) for k, v in node.items() if k not in ("documentation", "documentationUrl")}
    if isinstance(node, list):
        return [_without_docs(v) for v in node]
    return node


def trimmed(model: dict, keep: list[str]) -> dict:
    """The model with only `keep` operations and the shapes they reach (inputs, outputs, errors)."""
    ops = {name: model["operations"][name] for name in keep}
    shapes: dict[str, Any] = {}
    pending = list(_shape_refs(ops))
    while pending:
        name = pending.pop()
        if name not in shapes:
            shapes[name] = model["shapes"][name]
            pending.extend(_shape_refs(shapes[name]))
    return _without_docs({"version": model.get("version"), "metadata": model["metadata"], "operations": ops,
                          "shapes": dict(sorted(shapes.items()))})


def generate(actions: list[str]) -> dict[str, str]:
    """{relative path: JSON text} of the lean models, from the installed (pinned) botocore."""
    loader = create_loader()
    files = {}
    files_for = operations(actions)
    for service, ops in files_for.items():
        version = loader.determine_latest_version(service, "service-2")
        model = loader.load_service_model(service, "service-2", version)
        files[f"{service}/{version}/service-2.json"] = json.dumps(trimmed(model, ops), separators=(",", ":"),
                                                                  sort_keys=False) + "\n"
    # Every client's first use parses botocore's endpoints.json (1.2 MB, every service in every partition,
    # about 12 ms of CPU): the function's copy names its own services only.
    endpoints = loader.load_data("endpoints")
    for partition in endpoints["partitions"]:
        partition["services"] = {name: value for name, value in partition["services"].items() if name in files_for}
    files["endpoints.json"] = json.dumps(endpoints, separators=(",", ":")) + "\n"
    return files


def write(actions: list[str], directory: Path = MODELS_DIR) -> list[Path]:
    written = []
    for relative, text in generate(actions).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
