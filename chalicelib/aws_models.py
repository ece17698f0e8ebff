"""Lean botocore service models for the Lambda: only the operations the function calls (iam_policy.ACTIONS).

A botocore client parses its whole service model when it is created: IoT's is 1 MB of JSON (about 80 ms),
DynamoDB's and SSM's another 1.5 MB, paid by every cold container. The function's clients read these
trimmed copies instead (made from the pinned botocore by `admin --stage prod policy --write`, checked fresh
by a test); operators' and tests' clients keep the full models. An operation missing here fails loudly
(the client has no such method), and its IAM action would be missing too: add it to ACTIONS and regenerate.
"""
import gzip
import json
from pathlib import Path
from typing import Any, Iterator

from botocore.loaders import JSONFileLoader, Loader, create_loader

MODELS_DIR = Path(__file__).resolve().parent / "botocore_models"


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


class _PlainJsonFileLoader(JSONFileLoader):
    """botocore parses with object_pairs_hook=OrderedDict, twice as slow as plain dicts (ordered since 3.7)."""

    def load_file(self, file_path: str) -> Any:
        for suffix, opener in ((".json", open), (".json.gz", gzip.open)):
            try:
                with opener(file_path + suffix, "rb") as stream:
                    return json.loads(stream.read())
            except FileNotFoundError:
                continue
        return None


class _LeanLoader(Loader):
    def list_available_services(self, type_name: str) -> list[str]:
        # botocore lists every service directory of every search path (400+ stat calls each) to check the
        # name; the function knows its few services.
        return sorted(path.name for path in MODELS_DIR.iterdir() if path.is_dir())


def lean_loader() -> Loader:
    """A data loader that finds the lean service models first, then botocore's own data (endpoints, rules)."""
    return _LeanLoader(extra_search_paths=[str(MODELS_DIR)], file_loader=_PlainJsonFileLoader())
