"""YAML job files for `rotfuse merge --config` and `rotfuse stats --config`.

A job file is a mapping whose keys are the command's flags without the leading dashes (dashes or
underscores alike), e.g. `method: regmean`, `models: [a/, b/]`, `fisher-floor: 1e-8`. Paths in
it are relative to the current directory, exactly as on the command line. A flag given on the
command line wins over the file. Unknown keys are refused, so a typo never goes unnoticed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rotfuse.core.errors import InputError, UsageError


@dataclass
class Settings:
    """Command-line values over job-file values over defaults. A flag that was not given is None
    (pass plain on/off flags as `flag or None`, so that an unset one leaves the file's value)."""

    flags: dict[str, Any]
    job: dict[str, Any]

    def get(self, key: str, default: Any = None) -> Any:
        value = self.flags.get(key)
        return value if value is not None else self.job.get(key, default)

    def path(self, key: str) -> Path | None:
        value = self.get(key)
        return None if value is None else Path(value)


@dataclass(frozen=True)
class Kind:
    """What a job-file value must be: the type its flag takes, and the flag's range. A job file
    gets no more leeway than the command line: `fsync: 'no'` is not a boolean (and would read as
    true), `max_rounds: -3` is not a round count."""

    type: str  # bool, int, float, text (a string, or a number given as one), list (of strings or numbers)
    minimum: float | None = None
    maximum: float | None = None

    def check(self, value: Any, key: str, where: Path) -> Any:
        if value is None:
            return None
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.type == "bool" and not isinstance(value, bool):
            raise UsageError(f"{where}: {key}: must be true or false, got {value!r}")
        if self.type == "int" and (not numeric or not isinstance(value, int)):
            raise UsageError(f"{where}: {key}: must be an integer, got {value!r}")
        if self.type == "float" and (not numeric or not math.isfinite(value)):
            raise UsageError(f"{where}: {key}: must be a finite number, got {value!r}")
        if self.type == "text" and not (isinstance(value, str) or numeric):
            raise UsageError(f"{where}: {key}: must be a single value, got {value!r}")
        if self.type == "list":
            items = value if isinstance(value, list) else [value]
            if not all(
                isinstance(item, str) or (isinstance(item, (int, float)) and not isinstance(item, bool))
                for item in items
            ):
                raise UsageError(f"{where}: {key}: must be a value or a list of values, got {value!r}")
        if numeric and self.type in ("int", "float"):
            if self.minimum is not None and value < self.minimum:
                raise UsageError(f"{where}: {key}: must be >= {self.minimum:g}, got {value!r}")
            if self.maximum is not None and value > self.maximum:
                raise UsageError(f"{where}: {key}: must be <= {self.maximum:g}, got {value!r}")
        return value


BOOL, TEXT, LIST = Kind("bool"), Kind("text"), Kind("list")


def load_config(path: Path | None, command: str, known: Mapping[str, Kind]) -> dict[str, Any]:
    """The job file's settings with keys normalised to flag names in snake_case ({} without a
    file), every value checked against its flag's type and range."""
    if path is None:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: the job file is not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise InputError(f"{path}: the job file is nested too deeply") from None
    except (OSError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the job file ({' '.join(str(exc).split())})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a job file must be a YAML mapping of flag names to values")
    settings = {str(key).replace("-", "_"): value for key, value in raw.items()}
    for key, value in settings.items():
        if key not in known:
            raise UsageError(
                f"{path}: unknown setting {key!r} for rotfuse {command} (known: {', '.join(sorted(known))})"
            )
        known[key].check(value, key, Path(path))
    return settings


def as_list(value: Any, split: bool = True) -> list[str]:
    """A YAML list, a comma-separated string (unless `split` is off: regexes), or a repeated
    flag's values -> a flat list of strings."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    parts = [part for item in items for part in (str(item).split(",") if split else [str(item)])]
    return [part.strip() for part in parts if part.strip()]
