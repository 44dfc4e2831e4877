"""`--layers 0-5,8`: which layers a command touches, kept as ranges.

The ranges are never expanded into a set of numbers: `--layers 0-99999999999` must be refused by
comparing it with the model's layer count, not enumerated first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerRanges:
    """Inclusive ranges of layer indices, as the user wrote them."""

    ranges: tuple[tuple[int, int], ...]
    text: str = ""

    def __contains__(self, index: object) -> bool:
        return isinstance(index, int) and any(low <= index <= high for low, high in self.ranges)

    def first_missing(self, available: Iterable[int]) -> int | None:
        """The smallest wanted index that is not in `available` (at most len(available) steps
        per range), or None when every wanted layer exists."""
        have = set(available)
        for low, high in sorted(self.ranges):
            index = low
            while index <= high and index in have:
                index += 1
            if index <= high:
                return index
        return None


def parse_layer_ranges(text: str) -> LayerRanges | None:
    """'0-5,8' -> ranges (0, 5), (8, 8); ValueError when it is not of that form."""
    ranges: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        low_text, _, high_text = part.partition("-")
        low = int(low_text)
        high = int(high_text) if high_text else low
        if low < 0 or low > high:
            raise ValueError(part)
        ranges.append((low, high))
    if not ranges:
        raise ValueError(text)
    return LayerRanges(tuple(ranges), text)
