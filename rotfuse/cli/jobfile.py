"""YAML job files for `rotfuse merge --config` and `rotfuse stats --config`.

A job file is a mapping whose keys are the command's flags without the leading dashes (dashes or
underscores alike), e.g. `method: regmean`, `models: [a/, b/]`, `fisher-floor: 1e-8`. Paths in
it are relative to the current directory, exactly as on the command line. A flag given on the
command line wins over the file. Unknown keys are refused, so a typo never goes unnoticed.
"""

from __future__ import annotations

from collections.abc import Iterable
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


def load_config(path: Path | None, command: str, known: Iterable[str]) -> dict[str, Any]:
    """The job file's settings with keys normalised to flag names in snake_case ({} without a file)."""
    if path is None:
        return {}
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise InputError(f"{path}: cannot read the job file ({exc})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f"{path}: a job file must be a YAML mapping of flag names to values")
    allowed = set(known)
    settings = {str(key).replace("-", "_"): value for key, value in raw.items()}
    for key in settings:
        if key not in allowed:
            raise UsageError(f"{path}: unknown setting {key!r} for rotfuse {command} "
                             f"(known: {', '.join(sorted(allowed))})")
    return settings


def as_list(value: Any, split: bool = True) -> list[str]:
    """A YAML list, a comma-separated string (unless `split` is off: regexes), or a repeated
    flag's values -> a flat list of strings."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    parts = [part for item in items for part in (str(item).split(",") if split else [str(item)])]
    return [part.strip() for part in parts if part.strip()]
