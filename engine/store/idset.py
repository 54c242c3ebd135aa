"""A compact set of event ids, for a throw-away store (replay) that must remember every id it
has seen but never ages one out or shows one to anyone.

A million ids in a Python set take about 70 MB (the table and an int object per id); here
they take 8 MB, as a sorted array of 64-bit integers. Event ids grow with time, so nearly
every new id lands at the end of the array; the few that arrive out of order are kept in a
small set beside it. Looking an id up costs a binary search in the array.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable


class IdSet:
    __slots__ = ("_ascending", "_stragglers")

    def __init__(self) -> None:
        self._ascending = array("q")
        self._stragglers: set[int] = set()

    def __len__(self) -> int:
        return len(self._ascending) + len(self._stragglers)

    def __contains__(self, event_id: int) -> bool:
        ascending = self._ascending
        if ascending and event_id <= ascending[-1]:
            at = bisect_left(ascending, event_id)
            if ascending[at] == event_id:
                return True
        return event_id in self._stragglers

    def missing(self, event_ids: Iterable[int]) -> set[int]:
        """The ids among `event_ids` that are not in the set. An id above the array's last
        is not: every straggler was at most the last when it came."""
        ascending = self._ascending
        if not ascending:  # then there are no stragglers either
            return set(event_ids)
        top = ascending[-1]
        return {event_id for event_id in event_ids if event_id > top or event_id not in self}

    def add_all(self, event_ids: Iterable[int]) -> None:
        ascending = self._ascending
        ids = event_ids if type(event_ids) is list else list(event_ids)
        if ids and (not ascending or ids[0] > ascending[-1]) and ids == sorted(set(ids)):
            ascending.extend(ids)  # the common batch: ascending, all newer (no loop in Python)
            return
        for event_id in ids:
            if not ascending or event_id > ascending[-1]:
                ascending.append(event_id)
            elif event_id not in self:
                self._stragglers.add(event_id)
