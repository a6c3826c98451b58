"""GPA ranges: the direction of the last conversion of every GPA, and range subtraction.

"No GPA backed twice" (H2) is judged per range on where each range's last conversion
went; a storm converts the same pages back and forth thousands of times, so the state is
kept as disjoint, merged intervals rather than per page. Pure.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence


class RangeStates:
    """The direction of the last conversion of every GPA seen, as disjoint intervals.

    `set(start, end, private)` overwrites; adjacent intervals of the same state merge,
    so a storm over the same pages stays a handful of intervals.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._items: list[tuple[int, int, bool]] = []  # (start, end, private), sorted

    def set(self, start: int, end: int, private: bool) -> None:
        if end <= start:
            return
        i = bisect.bisect_right(self._starts, start) - 1
        if i < 0 or self._items[i][1] <= start:
            i += 1
        j = i
        while j < len(self._items) and self._items[j][0] < end:
            j += 1
        new: list[tuple[int, int, bool]] = []
        if i < j and self._items[i][0] < start:
            new.append((self._items[i][0], start, self._items[i][2]))
        new.append((start, end, private))
        if i < j and self._items[j - 1][1] > end:
            new.append((end, self._items[j - 1][1], self._items[j - 1][2]))
        # Merge with the untouched neighbours when they touch and agree.
        if i > 0 and self._items[i - 1][1] == new[0][0] and self._items[i - 1][2] == new[0][2]:
            i -= 1
            new[0] = (self._items[i][0], new[0][1], new[0][2])
        if (
            j < len(self._items)
            and self._items[j][0] == new[-1][1]
            and (self._items[j][2] == new[-1][2])
        ):
            new[-1] = (new[-1][0], self._items[j][1], new[-1][2])
            j += 1
        merged: list[tuple[int, int, bool]] = []
        for item in new:
            if merged and merged[-1][1] == item[0] and merged[-1][2] == item[2]:
                merged[-1] = (merged[-1][0], item[1], item[2])
            else:
                merged.append(item)
        self._items[i:j] = merged
        self._starts[i:j] = [item[0] for item in merged]

    def ranges(self, private: bool) -> list[tuple[int, int]]:
        """(gpa, size) of every interval whose last conversion went to `private`."""
        return [(s, e - s) for s, e, p in self._items if p == private]

    def state(self, gpa: int) -> bool | None:
        """True/False for private/shared at `gpa`; None when it was never converted."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and self._items[i][0] <= gpa < self._items[i][1]:
            return self._items[i][2]
        return None

    def __len__(self) -> int:
        return len(self._items)


def subtract_ranges(
    ranges: Sequence[tuple[int, int]], minus: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(start, size) pieces of `ranges` not covered by `minus` (both lists of (start, size))."""
    cut = sorted((s, s + n) for s, n in minus if n > 0)
    out: list[tuple[int, int]] = []
    for start, size in sorted(ranges):
        cursor, end = start, start + size
        for c_start, c_end in cut:
            if c_end <= cursor or c_start >= end:
                continue
            if c_start > cursor:
                out.append((cursor, c_start - cursor))
            cursor = max(cursor, c_end)
            if cursor >= end:
                break
        if cursor < end:
            out.append((cursor, end - cursor))
    return out
