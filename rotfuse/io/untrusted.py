"""Reading files rotfuse did not write: one parsing step that turns anything unexpected into an
`InputError` naming the file (and the field), never a stray exception.

Every JSON document a user hands over -- a safetensors header, a shard index, config.json, a
statistics manifest, a line of a .jsonl data file, curves to overlay -- is parsed by `parse_json`:
strict JSON (no NaN or Infinity, no number too large for a float), no name given twice in one
object (the safetensors format forbids it, and a silent "last one wins" hides a corrupt file), and
nesting too deep for the parser is a bad file, not a crash. The `require_*` helpers then check a
field's type with a message that names the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rotfuse.core.errors import InputError


class _Repeated(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Repeated(key)
        result[key] = value
    return result


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is too large")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(raw: bytes | str, where: Path | str, what: str, problem: str = "cannot parse") -> Any:
    """Parse one untrusted JSON document; `where` and `what` name it in errors, `problem` says
    what a syntax error means ("cannot parse config", "corrupt safetensors header")."""
    try:
        return json.loads(raw, object_pairs_hook=_no_repeats, parse_float=_finite_float, parse_constant=_constant)
    except _Repeated as exc:
        raise InputError(f"{where}: {what} gives {exc.key!r} twice") from None
    except RecursionError:
        raise InputError(f"{where}: {what} is nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: {what} is not UTF-8 (byte {exc.start})") from None
    except ValueError as exc:  # json.JSONDecodeError, too-long integers, non-finite numbers
        raise InputError(f"{where}: {problem} {what} ({exc})") from None


def read_json(path: Path, what: str) -> Any:
    """A whole JSON file."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: missing {what} file") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read {what} ({exc.strerror or exc})") from exc
    return parse_json(raw, path, what)


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise InputError(f"{path}: {what} is not a JSON object")
    return value


def require_object(value: Any, where: Path | str, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InputError(f"{where}: {field} must be a JSON object, got {_kind(value)}")
    return value


def require_text(value: Any, where: Path | str, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{where}: {field} must be a string, got {_kind(value)}")
    return value


def require_int(value: Any, where: Path | str, field: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{where}: {field} must be an integer >= {minimum}, got {_short(value)}")
    return value


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
