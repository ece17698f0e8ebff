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
from typing import Any

from botocore.loaders import JSONFileLoader, Loader

MODELS_DIR = Path(__file__).resolve().parent / "botocore_models"














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
