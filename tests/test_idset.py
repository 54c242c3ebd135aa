"""The compact id set of a throw-away store answers as a Python set would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.store.idset import IdSet

ids = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.lists(st.one_of(ids, st.integers(0, 50)), max_size=30),
            st.lists(st.integers(0, 10**6), max_size=30).map(sorted),  # the common batch
        ),
        max_size=8,
    ),
    ids,
)
def test_idset_holds_what_was_added_and_nothing_else(batches, probe):
    compact, reference = IdSet(), set()
    for batch in batches:
        compact.add_all(batch)
        reference.update(batch)
        probes = [*batch, probe, probe + 1 if probe < 2**63 - 1 else probe, *list(reference)[:5]]
        for event_id in probes:
            assert (event_id in compact) == (event_id in reference)
        assert compact.missing(probes) == set(probes) - reference
    assert len(compact) == len(reference)
    assert compact.missing([]) == set()


def test_ids_in_time_order_take_eight_bytes_each():
    compact = IdSet()
    compact.add_all(range(10**14, 10**14 + 100_000, 3))
    compact.add_all([10**14 + 1, 10**14 + 3])  # one straggler, one repeat
    assert len(compact) == 33_335
    assert 10**14 + 1 in compact and 10**14 + 2 not in compact
    assert len(compact._stragglers) == 1
