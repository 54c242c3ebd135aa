"""The overview's chart: what each minute added to the daemon's own counters."""

from __future__ import annotations

from engine.console.rates import Rates, chart
from engine.metrics import Metrics


def test_each_minute_shows_the_new_events_and_actions_it_added():
    metrics = Metrics()
    rates = Rates(metrics.registry, kept=2)
    rates.sample(0.0)
    metrics.events_new.labels("poller").inc(5)
    metrics.actions.labels("suspend_sim", "done").inc(2)
    metrics.actions.labels("webhook", "dead").inc()
    rates.sample(60.0)
    metrics.events_new.labels("data_streamer").inc(3)
    rates.sample(120.0)
    assert [(m.at, m.events, m.actions) for m in rates.minutes()] == [
        (60.0, 5.0, 3.0),
        (120.0, 3.0, 0.0),
    ]
    rates.sample(180.0)  # only the last two minutes are kept
    assert [m.at for m in rates.minutes()] == [120.0, 180.0]


def test_the_chart_scales_its_bars_to_the_busiest_minute():
    metrics = Metrics()
    rates = Rates(metrics.registry)
    rates.sample(0.0)
    metrics.events_new.labels("poller").inc(10)
    metrics.actions.labels("suspend_sim", "done").inc(5)
    rates.sample(60.0)
    drawn = chart(rates.minutes(), width=100, height=50)
    heights = {bar["kind"]: bar["height"] for bar in drawn["bars"]}
    assert heights == {"events": 50.0, "actions": 25.0}
    assert (drawn["events"], drawn["actions"], drawn["peak"]) == (10, 5, 10)
