"""TOML in and out: `tomllib` (tomli before Python 3.11) reads, tomli-w writes."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import tomli_w

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

TOMLDecodeError = tomllib.TOMLDecodeError
loads = tomllib.loads


def dumps(data: Mapping[str, Any]) -> str:
    """TOML text of `data`; None values are left out (TOML has no null)."""
    return tomli_w.dumps(_without_none(data))


def _without_none(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_without_none(v) for v in value]
    return value
