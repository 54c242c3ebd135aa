"""Several organisations in one engine (`organisations:`), over loopback HTTP against a
simulator serving two organisations by token, and a real SQLite file."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client import generate_latest

from engine.cli import main
from engine.commands.status import collect, render
from engine.commands.why import collect as why
from engine.config import Config, UiSettings, load_config
from engine.console.app import console_pages
from engine.cron import check_crontab
from engine.daemon import Daemon
from engine.errors import ConfigError, RuleSetError
from engine.health import HealthSettings, StreamWatchdog
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.model import Batch, Intent, IntentStatus
from engine.rules import RuleSet, load_rules
from engine.simulator import SimulatorConfig
from engine.simulator.organisations import organisation_configs
from engine.simulator.server import OrganisationsSimulator
from engine.sources.poller import PollerSource
from engine.sources.streamer import StreamerSettings
from engine.store import SqliteStore

from helpers import eventually, ingest_url, metric_value, running_daemon

SUSPENDED = 2
QUOTA_USED_UP = 19
STREAM_SECRET = "streamer-secret-for-tests-0123"


@pytest.fixture
def organisations() -> Iterator[OrganisationsSimulator]:
    configs = organisation_configs(["acme", "globex"], SimulatorConfig(endpoints=4))
    with OrganisationsSimulator(configs) as server:
        yield server


def _config(tmp_path: Path, server: OrganisationsSimulator, globex: str = "") -> Config:
    """Two organisations on the simulator; `globex`: more keys of globex's entry."""
    path = tmp_path / "engine.yaml"
    path.write_text(
        textwrap.dedent(f"""\
            api:
              base_url: {server.base_url}
              backoff_initial: 0.01
              backoff_max: 0.05
            store: {{path: state/engine.sqlite3}}
            poller: {{interval: 1s, initial_lookback: 5m}}
            rules: rules
            organisations:
              - name: acme
                application_token: ${{ACME_TOKEN}}
              - name: globex
                application_token: ${{GLOBEX_TOKEN}}
            """)
        + "".join(f"    {line}\n" for line in globex.splitlines()),
        encoding="utf-8",
    )
    return load_config(path)


def _rules(config: Config, text: str) -> RuleSet:
    config.rules.mkdir(exist_ok=True)
    (config.rules / "rules.yaml").write_text(textwrap.dedent(text), encoding="utf-8")
    return load_rules(config.rules, cron=check_crontab, organisations=config.rule_scopes)


def _daemon(config: Config, rules: RuleSet, tokens: dict[str, str]) -> Daemon:
    return Daemon(config, rules, "", organisation_tokens=tokens)


def _tokens(server: OrganisationsSimulator, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    tokens = {name: server.application_token(name) for name in ("acme", "globex")}
    monkeypatch.setenv("ACME_TOKEN", tokens["acme"])
    monkeypatch.setenv("GLOBEX_TOKEN", tokens["globex"])
    return tokens


def _pollers(daemon: Daemon) -> dict[str, PollerSource]:
    return {
        source.context.organisation: source
        for source in daemon.sources
        if isinstance(source, PollerSource)
    }


async def _poll_and_dispatch(daemon: Daemon) -> None:
    for source in _pollers(daemon).values():
        await source.poll()
    while await daemon.dispatcher.run_due():
        pass


def _quota_used_up(server: OrganisationsSimulator, name: str, **extra: object) -> dict:
    sim = server.state(name).sims()[0]
    (event,) = server.state(name).store_events(
        [{"event_type": {"id": QUOTA_USED_UP}, "sim_id": sim["id"], **extra}]
    )
    return event


SUSPEND = """
rules:
  - id: suspend-on-quota
    when: {type: [19]}
    actions:
      - suspend_sim: {}
"""


async def test_each_organisation_acts_on_its_own_events_with_its_own_token(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    acme_event = _quota_used_up(organisations, "acme")
    globex_event = _quota_used_up(organisations, "globex")
    daemon = _daemon(config, _rules(config, SUSPEND), tokens)
    try:
        await _poll_and_dispatch(daemon)
        lines = sorted(source.startup_line() for source in _pollers(daemon).values())
    finally:
        await daemon.aclose()

    assert lines == [
        "poller of organisation acme (every 1s, overlap 2m)",
        "poller of organisation globex (every 1s, overlap 2m)",
    ]
    for name, event in (("acme", acme_event), ("globex", globex_event)):
        state = organisations.state(name)
        assert state.sim(event["sim"]["id"])["status"]["id"] == SUSPENDED
        changes = [r for r in state.requests() if r.method == "PATCH"]
        assert [r.path for r in changes] == [f"/api/v1/sim/{event['sim']['id']}"]
        assert {r.organisation for r in changes} == {name}
    store = SqliteStore(config.store_path)
    planned = {r["organisation"]: r["event_id"] for r in store.audit_rows() if r["action"]}
    assert planned == {"acme": acme_event["id"], "globex": globex_event["id"]}


async def test_an_organisation_whose_token_is_refused_is_paused_and_the_other_goes_on(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    monkeypatch.setenv("GLOBEX_TOKEN", "a-revoked-token")
    config = _config(tmp_path, organisations)
    acme_event = _quota_used_up(organisations, "acme")
    globex_event = _quota_used_up(organisations, "globex")
    daemon = _daemon(config, _rules(config, SUSPEND), {**tokens, "globex": "a-revoked-token"})
    try:
        await _poll_and_dispatch(daemon)
        readiness = {name: source.readiness() for name, source in _pollers(daemon).items()}
    finally:
        await daemon.aclose()

    assert organisations.state("acme").sim(acme_event["sim"]["id"])["status"]["id"] == SUSPENDED
    globex = organisations.state("globex")
    assert globex.sim(globex_event["sim"]["id"])["status"]["id"] != SUSPENDED
    assert readiness["acme"].ok
    assert not readiness["globex"].ok
    assert readiness["globex"].name == "poll:globex"
    assert "organisation globex paused" in readiness["globex"].detail
    store = SqliteStore(config.store_path)
    status = collect(store, str(config.store_path), organisations=["acme", "globex"])
    assert status["organisations"]["globex"]["paused_until"] is not None
    assert status["organisations"]["acme"]["paused_until"] is None
    assert status["organisations"]["acme"]["cursor"] is not None
    assert "PAUSED until" in render(status)


async def test_a_rule_scoped_to_an_organisation_judges_only_its_events(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    rules = _rules(
        config,
        """
        rules:
          - id: acme-only
            organisation: acme
            when: {type: [19]}
            actions: [{log: {message: "acme quota"}}]
          - id: everyone
            when: {type: [19]}
            actions: [{log: {message: "any quota"}}]
        """,
    )
    _quota_used_up(organisations, "acme")
    _quota_used_up(organisations, "globex")
    daemon = _daemon(config, rules, tokens)
    try:
        await _poll_and_dispatch(daemon)
    finally:
        await daemon.aclose()

    store = SqliteStore(config.store_path)
    matched = {
        (r["organisation"], r["rule_id"]) for r in store.audit_rows() if r["outcome"] == "matched"
    }
    assert matched == {("acme", "acme-only"), ("acme", "everyone"), ("globex", "everyone")}


async def test_the_same_event_id_in_two_organisations_is_judged_in_both(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    shared_id = 412907744599999
    acme_event = _quota_used_up(organisations, "acme", id=shared_id)
    globex_event = _quota_used_up(organisations, "globex", id=shared_id)
    daemon = _daemon(config, _rules(config, SUSPEND), tokens)
    try:
        await _poll_and_dispatch(daemon)
        await _poll_and_dispatch(daemon)  # polled again: seen in each, judged once in each
    finally:
        await daemon.aclose()

    for name, event in (("acme", acme_event), ("globex", globex_event)):
        sim_id = event["sim"]["id"]
        assert organisations.state(name).sim(sim_id)["status"]["id"] == SUSPENDED
    store = SqliteStore(config.store_path)
    intents = store.intents()
    assert sorted(i.idempotency_key for i in intents) == [
        f"acme:{shared_id}-suspend-on-quota-0",
        f"globex:{shared_id}-suspend-on-quota-0",
    ]
    explained = why(store, event_id=shared_id)
    assert sorted(e["organisation"] for e in explained["events"]) == ["acme", "globex"]


async def test_a_rule_in_an_organisations_folder_judges_only_its_events(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    (tmp_path / "globex-rules").mkdir()
    (tmp_path / "globex-rules" / "own.yaml").write_text(
        "rules:\n  - id: globex-own\n    when: {type: [19]}\n    actions: [{log: {}}]\n",
        encoding="utf-8",
    )
    config = _config(tmp_path, organisations, globex="rules: globex-rules")
    rules = _rules(
        config, "rules:\n  - id: everyone\n    when: {type: [19]}\n    actions: [{log: {}}]\n"
    )
    own, shared = rules.get("globex-own"), rules.get("everyone")
    assert own is not None and own.organisation == "globex"
    assert shared is not None and shared.organisation is None
    _quota_used_up(organisations, "acme")
    _quota_used_up(organisations, "globex")
    daemon = _daemon(config, rules, tokens)
    try:
        await _poll_and_dispatch(daemon)
    finally:
        await daemon.aclose()
    store = SqliteStore(config.store_path)
    owners = {r["organisation"] for r in store.audit_rows() if r["rule_id"] == "globex-own"}
    assert owners == {"globex"}


# -- what the loader and the config refuse ----------------------------------------------------


def _rule_naming(tmp_path: Path, organisation: str) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(
        f"rules:\n  - id: r\n    organisation: {organisation}\n"
        "    when: {type: [19]}\n    actions: [{log: {}}]\n",
        encoding="utf-8",
    )
    return path


def test_a_rule_naming_an_unknown_organisation_is_a_load_error_with_its_line(tmp_path):
    path = _rule_naming(tmp_path, "acne")
    with pytest.raises(RuleSetError) as raised:
        load_rules(path, organisations={"acme": None, "globex": None})
    (error,) = raised.value.errors
    assert error.where is not None and (error.where.file, error.where.line) == (str(path), 3)
    assert "unknown organisation 'acne'" in str(error)
    assert "acme" in str(error)


def test_a_rule_naming_an_organisation_without_organisations_configured_is_a_load_error(
    tmp_path,
):
    path = _rule_naming(tmp_path, "acme")
    with pytest.raises(RuleSetError, match="lists no `organisations:`"):
        load_rules(path, organisations={})


def _config_error(tmp_path: Path, text: str) -> ConfigError:
    path = tmp_path / "engine.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value


def test_two_organisations_of_one_name_are_a_config_error(tmp_path):
    error = _config_error(
        tmp_path,
        """\
        organisations:
          - name: acme
            application_token: ${ACME_TOKEN}
          - name: acme
            application_token: ${OTHER_TOKEN}
        """,
    )
    assert "two organisations are named 'acme'" in error.message
    assert error.where is not None and error.where.line == 4


def test_an_organisation_without_a_token_is_a_config_error(tmp_path):
    error = _config_error(tmp_path, "organisations:\n  - name: acme\n")
    assert "organisation 'acme' has no application token" in error.message
    assert "organisations[0].application_token" in error.message


def test_an_organisations_token_written_into_the_file_is_a_config_error(tmp_path):
    error = _config_error(
        tmp_path, "organisations:\n  - name: acme\n    application_token: abc123secret\n"
    )
    assert "organisations[0].application_token" in error.message
    assert "abc123secret" not in str(error)


def test_organisations_beside_the_api_application_token_is_a_config_error(tmp_path):
    error = _config_error(
        tmp_path,
        """\
        api:
          application_token: ${EMNIFY_APPLICATION_TOKEN}
        organisations:
          - name: acme
            application_token: ${ACME_TOKEN}
        """,
    )
    assert "`api.application_token` and `organisations:`" in error.message
    assert error.where is not None and error.where.line == 2


def test_an_organisations_own_rate_limits_override_the_apis(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text(
        textwrap.dedent("""\
            api: {event_rate_limit: 5}
            organisations:
              - name: acme
                application_token_file: secrets/acme
                api: {event_rate_limit: 2, action_rate_limit: 1}
              - name: globex
                application_token: ${GLOBEX_TOKEN}
            """),
        encoding="utf-8",
    )
    acme, globex = load_config(path).organisations
    assert (acme.api.event_rate_limit, acme.api.action_rate_limit) == (2, 1)
    assert acme.token_file == tmp_path / "secrets" / "acme"
    assert globex.api.event_rate_limit == 5


def test_a_config_without_organisations_keeps_the_single_organisation(tmp_path):
    path = tmp_path / "engine.yaml"
    path.write_text("api:\n  application_token: ${EMNIFY_APPLICATION_TOKEN}\n", encoding="utf-8")
    config = load_config(path)
    assert config.organisations == ()
    assert config.rule_scopes == {}


# -- the running daemon: its scheduler polls each organisation, /readyz and /metrics say so ----


async def test_the_running_daemon_names_the_paused_organisation_in_readyz_and_metrics(
    tmp_path, organisations, monkeypatch
):
    tokens = {**_tokens(organisations, monkeypatch), "globex": "a-revoked-token"}
    monkeypatch.setenv("GLOBEX_TOKEN", "a-revoked-token")
    config = replace(
        _config(tmp_path, organisations),
        health=HealthSettings(check_every=timedelta(seconds=1)),
    )
    acme_event = _quota_used_up(organisations, "acme")
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(
        config, _rules(config, SUSPEND), "", services=[service], organisation_tokens=tokens
    )
    acme = organisations.state("acme")
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        await eventually(lambda: acme.sim(acme_event["sim"]["id"])["status"]["id"] == SUSPENDED)
        await eventually(lambda: _pollers(daemon)["globex"].poller.paused_until is not None)
        ready = (await client.get(service.base_url + "/readyz")).json()
        metrics = (await client.get(service.base_url + "/metrics")).text
        store = SqliteStore(config.store_path)
        await eventually(lambda: _engine_events(store, "refused the application token"))
    (said,) = _engine_events(store, "refused the application token")
    assert "organisation globex (HTTP 401)" in said
    globex_error = _pollers(daemon)["globex"].poller.last_error or ""
    assert "check the application token of organisation globex" in globex_error

    assert daemon.metrics.organisation_login_refused == {"acme": False, "globex": 401}
    checks = ready["checks"]
    assert not ready["ready"]
    assert checks["poll:acme"]["ok"]
    assert checks["poll:globex"]["ok"] is False
    assert "organisation globex paused" in checks["poll:globex"]["detail"]
    assert metric_value(metrics, "event_engine_organisation_paused", organisation="globex") == 1
    assert metric_value(metrics, "event_engine_organisation_paused", organisation="acme") == 0
    polls = "event_engine_organisation_polls_total"
    assert metric_value(metrics, polls, organisation="acme", result="ok")
    assert metric_value(metrics, polls, organisation="globex", result="failed")
    assert not metric_value(metrics, polls, organisation="globex", result="ok")
    lag = "event_engine_organisation_poll_lag_seconds"
    assert metric_value(metrics, lag, organisation="acme") < 60
    assert metric_value(metrics, lag, organisation="globex") >= 300  # still at its first start
    done = metric_value(
        metrics,
        "event_engine_organisation_actions_total",
        organisation="acme",
        kind="suspend_sim",
        outcome="done",
    )
    assert done == 1


def _engine_events(store: SqliteStore, text: str) -> list[str]:
    rows = store.audit_rows()
    return [r["detail"] for r in rows if r["outcome"] == "engine_event" and text in r["detail"]]


# -- the simulator's organisations ----------------------------------------------------------


async def test_the_simulator_answers_each_organisation_with_its_own_fleet(organisations):
    acme_sim = organisations.state("acme").sims()[0]["id"]
    globex_sim = organisations.state("globex").sims()[0]["id"]
    async with httpx.AsyncClient(base_url=organisations.base_url) as client:
        login = await client.post(
            "/api/v1/authenticate",
            json={"application_token": organisations.application_token("acme")},
        )
        bearer = {"Authorization": f"Bearer {login.json()['auth_token']}"}
        own = await client.get(f"/api/v1/sim/{acme_sim}", headers=bearer)
        other = await client.get(f"/api/v1/sim/{globex_sim}", headers=bearer)
        refused = await client.post("/api/v1/authenticate", json={"application_token": "nope"})
    assert own.status_code == 200
    assert own.json()["customer_org"]["name"] == "Acme GmbH"
    assert other.status_code == 404
    assert refused.status_code == 401
    acme_iccids = {s["iccid"] for s in organisations.state("acme").sims()}
    globex_iccids = {s["iccid"] for s in organisations.state("globex").sims()}
    assert not acme_iccids & globex_iccids


async def test_a_data_streamer_push_to_an_organisations_path_is_that_organisations(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = replace(_config(tmp_path, organisations), sources=("data_streamer",))
    config = config.with_source_settings(data_streamer=StreamerSettings(secret=STREAM_SECRET))
    globex = organisations.state("globex")
    pushed = globex.store_events(
        [{"event_type": {"id": QUOTA_USED_UP}, "sim_id": globex.sims()[0]["id"]}]
    )
    service = HttpService(HttpSettings(port=0))
    service.bind()
    daemon = Daemon(
        config, _rules(config, SUSPEND), "", services=[service], organisation_tokens=tokens
    )
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        secret = {"X-Emnify-Secret": STREAM_SECRET}
        answer = await client.post(
            ingest_url(service) + "/globex", content=orjson.dumps(pushed), headers=secret
        )
        plain = await client.post(ingest_url(service), content=b"[]", headers=secret)
        sim_id = pushed[0]["sim"]["id"]
        await eventually(lambda: globex.sim(sim_id)["status"]["id"] == SUSPENDED)

    assert answer.status_code == 200
    assert plain.status_code == 404  # with organisations, a push names its organisation
    changes = [r for r in globex.requests() if r.method == "PATCH"]
    assert {r.organisation for r in changes} == {"globex"}


async def test_a_condition_and_a_template_read_the_events_organisation(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    rules = _rules(
        config,
        """
        rules:
          - id: globex-by-condition
            when: {type: [19]}
            condition: {"==": [{"var": "org"}, "globex"]}
            actions: [{log: {message: "quota of {{ event.org }}"}}]
        """,
    )
    _quota_used_up(organisations, "acme")
    _quota_used_up(organisations, "globex")
    daemon = _daemon(config, rules, tokens)
    try:
        await _poll_and_dispatch(daemon)
    finally:
        await daemon.aclose()

    store = SqliteStore(config.store_path)
    (intent,) = store.intents()
    assert intent.target["organisation"] == "globex"
    assert intent.params["message"] == "quota of globex"


# -- the dispatcher never lends one organisation's token to another -------------------------


def _planned(
    store: SqliteStore,
    target: dict,
    key: str,
    kind: str = "suspend_sim",
    params: dict | None = None,
) -> None:
    intent = Intent(
        idempotency_key=key,
        event_id=1,
        rule_id="suspend-on-quota",
        action_index=0,
        kind=kind,
        params=params or {},
        target=target,
    )
    store.commit_batch(Batch(intents=[intent]), datetime.now(UTC))


async def test_an_intent_of_no_listed_organisation_fails_instead_of_borrowing_a_token(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    sim = organisations.state("acme").sims()[0]
    daemon = _daemon(config, _rules(config, SUSPEND), tokens)
    _planned(daemon.store, {"sim_id": sim["id"], "organisation": "initech"}, "gone")
    _planned(daemon.store, {"sim_id": sim["id"]}, "pushed")  # of no organisation
    # An action that calls no emnify API needs no organisation's token: it runs.
    _planned(daemon.store, {"sim_id": sim["id"]}, "logged", "log", {"message": "noted"})
    try:
        while await daemon.dispatcher.run_due():
            pass
    finally:
        await daemon.aclose()

    store = SqliteStore(config.store_path)
    errors = {i.idempotency_key: (i.status, i.last_error) for i in store.intents()}
    assert errors["gone"][0] is IntentStatus.FAILED
    assert errors["gone"][1] == (
        "planned for organisation 'initech', which the config no longer lists: not run with"
        " another organisation's token"
    )
    assert errors["pushed"][0] is IntentStatus.FAILED
    assert errors["pushed"][1] == (
        "planned for an event of no configured organisation (a Data Streamer push or an engine"
        " event): with `organisations:`, no token is known to be its own"
    )
    assert errors["logged"] == (IntentStatus.DONE, None)
    finished = [r["outcome"] for r in store.audit_rows() if r["intent_id"] is not None]
    assert sorted(finished) == ["failed", "failed", "logged"]
    assert organisations.state("acme").sim(sim["id"])["status"]["id"] != SUSPENDED


def test_validate_with_the_config_checks_the_organisations_rules_name(tmp_path, capsys):
    (tmp_path / "rules").mkdir()
    _rule_naming(tmp_path / "rules", "initech")
    config = tmp_path / "engine.yaml"
    config.write_text(
        "organisations:\n  - name: acme\n    application_token: ${ACME_TOKEN}\n",
        encoding="utf-8",
    )
    assert main(["validate", "--config", str(config)]) == 1
    assert "rules.yaml:3: rule `r`: unknown organisation 'initech'" in capsys.readouterr().err


def test_a_rule_test_event_names_its_organisation_by_org(tmp_path, capsys):
    (tmp_path / "rules.yaml").write_text(
        "rules:\n  - id: acme-only\n    organisation: acme\n    when: {type: [19]}\n"
        "    actions: [{suspend_sim: {}}]\n",
        encoding="utf-8",
    )
    (tmp_path / "test.yaml").write_text(
        textwrap.dedent("""\
            rules: rules.yaml
            defaults:
              event_type: {id: 19}
              sim: {id: 9, iccid: "8988303000000000009"}
            tests:
              - name: acme's event
                events: [{id: 1, org: acme}]
                expect: [{rule: acme-only, action: suspend_sim}]
              - name: globex's event with the same id
                events: [{id: 1, org: globex}]
                expect_none: true
            """),
        encoding="utf-8",
    )
    assert main(["test", str(tmp_path / "test.yaml")]) == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out


LOOK_UP = """
rules:
  - id: look-up-online
    when: {type: 19}
    lookup: [connectivity]
    actions: [{log: {}}]
"""


async def test_each_organisations_lookups_are_counted_in_the_metrics(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    _quota_used_up(organisations, "acme")
    _quota_used_up(organisations, "globex")
    daemon = _daemon(config, _rules(config, LOOK_UP), tokens)
    try:
        await _poll_and_dispatch(daemon)
        text = generate_latest(daemon.metrics.registry).decode()
    finally:
        await daemon.aclose()
    fetched = metric_value(
        text, "event_engine_lookups_total", fact="connectivity", outcome="fetched"
    )
    assert fetched == 2  # one endpoint's connectivity in each organisation


async def test_the_stream_watchdog_restarts_each_organisations_stream_with_its_own_token(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations).with_source_settings(
        data_streamer=StreamerSettings(watch=True, watch_every=timedelta(seconds=5))
    )
    daemon = _daemon(config, _rules(config, SUSPEND), tokens)
    globex = organisations.state("globex")
    try:
        [watchdog] = [s for s in daemon.services if isinstance(s, StreamWatchdog)]
        await watchdog.start(daemon)
        globex.data_streams.fail(1, "destination answered 502", globex.now())
        await watchdog.watch_once()
        await watchdog.watch_once()  # back to Running
        store = daemon.store
        said = [r["detail"] for r in store.audit_rows() if r["outcome"] == "engine_event"]
    finally:
        await daemon.aclose()
    assert globex.data_streams.restarts(1) == 1
    assert organisations.state("acme").data_streams.restarts(1) == 0
    restarts = [r for r in globex.requests() if r.path.endswith("/restart")]
    assert {r.organisation for r in restarts} == {"globex"}
    assert len(said) == 2 and all("globex" in detail for detail in said)
    assert "502" in said[0]


async def test_the_console_overview_has_a_poll_and_a_push_line_per_organisation(
    tmp_path, organisations, monkeypatch
):
    tokens = _tokens(organisations, monkeypatch)
    config = _config(tmp_path, organisations)
    viewer = "viewer-login-for-the-organisations-test"
    pages = console_pages(UiSettings(enabled=True), env={"EVENT_ENGINE_UI_VIEWER_TOKEN": viewer})
    service = HttpService(HttpSettings(port=0), pages)
    service.bind()
    daemon = Daemon(
        config, _rules(config, SUSPEND), "", organisation_tokens=tokens, services=[service]
    )
    try:
        for source in _pollers(daemon).values():
            await source.poll()
        await service.start(daemon)
        async with httpx.AsyncClient() as client:
            answer = await client.get(
                service.base_url + "/api/overview",
                headers={"authorization": f"Bearer {viewer}"},
            )
    finally:
        await service.stop()
        await daemon.aclose()
    lines = {line["name"]: line for line in answer.json()["source_health"]}
    assert lines["Event API poll (acme)"]["state"] == "ok"
    assert lines["Event API poll (globex)"]["state"] == "ok"
    assert {"Data Streamer push (acme)", "Data Streamer push (globex)"} <= set(lines)
    assert "Event API poll" not in lines
