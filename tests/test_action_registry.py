"""An action kind is one module, found by the registry; everything else asks the registry.

The proof is `sample_action.py`, a kind written as a module of `engine/actions/` would be:
registered for a test's duration, it is validated, checked at start-up, planned, stored in
the outbox, read back as its own type and run by the daemon against the simulator, with no
other file naming it. The README's table of kinds is the registry's too."""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import sample_action
from sample_action import TagDevice, Tagging

import engine.actions
import engine.actions.base
import engine.actions.suspend_sim
from engine.actions import ACTIONS, Action, calling_out, kinds_in, lane_of, register, registered
from engine.actions._docs import table, with_table
from engine.actions.log import LogLine
from engine.actions.send_sms import Sms
from engine.actions.suspend_sim import SuspendSim
from engine.actions.webhook import WebhookCall
from engine.cli import main
from engine.daemon import Daemon
from engine.errors import ConfigError
from engine.model import Batch, Intent, IntentStatus
from engine.simulator import SimulatorServer
from engine.startup import check_secrets

from helpers import TOKEN, engine_config, eventually, rules_from, running_daemon, write_rules

README = Path(__file__).parent.parent / "README.md"

TAGGING = """
rules:
  - id: tag-blocked
    when: {type: 19}
    actions:
      - tag_device: {registry: "${DEVICE_REGISTRY}", tag: "quota-{{ event.event_type.id }}"}
      - log: {message: "tagged {{ event.endpoint.name }}"}
"""


@pytest.fixture
def tag_device() -> Iterator[None]:
    with registered(sample_action):
        yield


async def test_a_kind_in_one_module_runs_end_to_end_in_the_daemon(
    tmp_path, simulator: SimulatorServer, monkeypatch, tag_device
):
    monkeypatch.setenv("DEVICE_REGISTRY", f"{simulator.base_url}/admin/endpoints")
    sim = simulator.state.sims()[0]
    endpoint = simulator.state.endpoint(sim["endpoint"]["id"])
    assert "quota-19" not in endpoint["tags"].split(",")
    daemon = Daemon(engine_config(tmp_path, simulator), rules_from(tmp_path, TAGGING), TOKEN)

    def closed(kind: str) -> list[IntentStatus]:
        return [i.status for i in daemon.store.intents() if i.kind == kind]

    async with running_daemon(daemon):
        first, second = simulator.state.store_events(
            [{"event_type": 19, "sim_id": sim["id"]}, {"event_type": 19, "sim_id": sim["id"]}]
        )
        await eventually(lambda: closed("tag_device") == [IntentStatus.DONE] * 2)
        audit = [
            (row["event_id"], row["outcome"])
            for row in daemon.store.audit_rows()
            if row["action"] == "tag_device" and row["intent_id"] is not None
        ]
        rows = _outbox_params(daemon.store.path, "tag_device")
        await eventually(lambda: closed("log") == [IntentStatus.DONE] * 2)

    # The effect: the registry (the simulator) has the tag once (each run appends it); the
    # second event's intent, run after the first on the endpoint's lane, read it back.
    tags = simulator.state.endpoint(endpoint["id"])["tags"].split(",")
    assert tags == [*endpoint["tags"].split(","), "quota-19"]
    assert sorted(audit) == [
        (first["id"], "tagged quota-19"),
        (second["id"], "already tagged"),
    ]
    # The outbox holds the typed parameters as JSON, the secret as its reference, and reads
    # them back as the same type.
    assert rows == ['{"registry":"${DEVICE_REGISTRY}","tag":"quota-19"}'] * 2
    assert TagDevice.decode(orjson.loads(rows[0])) == Tagging("${DEVICE_REGISTRY}", "quota-19")


def _outbox_params(path: str, kind: str) -> list[str]:
    with sqlite3.connect(path) as db:
        found = db.execute("SELECT params FROM outbox WHERE kind = ? ORDER BY id", (kind,))
        return [row[0] for row in found]


def test_validate_checks_a_new_kind_as_it_checks_the_built_in_ones(tmp_path, capsys, tag_device):
    good = write_rules(tmp_path, TAGGING, "good.yaml")
    assert main(["validate", str(good)]) == 0
    cases = {
        "tag_devise: {registry: '${R}', tag: x}": "unknown action `tag_devise` (did you mean"
        " `tag_device`?)",
        "tag_device: {registry: '${R}', tga: x}": "`tag_device` has no parameter `tga` (did you"
        " mean `tag`?)",
        "tag_device: {registry: '${R}'}": "`tag_device` needs the parameter `tag`",
        "tag_device: {registry: 'http://x', tag: x}": "`tag_device.registry` must be a secret",
        "tag_device: {registry: '${reg}', tag: x}": "`${reg}`: secret names are upper-case",
    }
    for number, (action, message) in enumerate(cases.items()):
        rules = write_rules(
            tmp_path,
            f"rules:\n  - id: r\n    when: {{type: 19}}\n    actions:\n      - {action}\n",
            f"bad-{number}.yaml",
        )
        assert main(["validate", str(rules)]) == 1
        err = capsys.readouterr().err
        assert f"{rules}:5:" in err and message in err, err


def test_the_start_up_check_asks_a_new_kind_for_its_secrets(tmp_path, tag_device):
    rules = rules_from(tmp_path, TAGGING)
    with pytest.raises(ConfigError) as refused:
        check_secrets(rules, env={})
    assert "${DEVICE_REGISTRY} (rule tag-blocked)" in str(refused.value)
    check_secrets(rules, env={"DEVICE_REGISTRY_FILE": "/run/secrets/registry"})


def test_a_kind_registered_for_a_test_is_gone_after_it():
    with registered(sample_action) as added:
        assert added == [TagDevice] and ACTIONS["tag_device"] is TagDevice
        assert "tag_device" in table()
    assert "tag_device" not in ACTIONS


def test_the_registry_is_read_only_and_refuses_a_kind_defined_twice():
    with pytest.raises(TypeError):
        ACTIONS["tag_device"] = TagDevice  # type: ignore[index]

    class Impostor(TagDevice):
        kind = "webhook"

    with pytest.raises(TypeError, match="'webhook' is defined twice"):
        register(Impostor)
    assert ACTIONS["webhook"].__module__ == "engine.actions.webhook"


HELPER_KIND = """
from engine.actions.base import Action


class HelperKind(Action):
    kind = "helper_kind"
    summary = "a kind in a helper module"

    @classmethod
    async def run(cls, params, ctx):
        return "done"
"""


def test_every_module_of_the_actions_package_is_found_without_a_list(tmp_path, monkeypatch):
    folder = Path(engine.actions.__file__).parent
    modules = {path.stem for path in folder.glob("*.py") if not path.stem.startswith("_")}
    # A helper module (its name starts with `_`) holding a kind: helpers are not searched.
    (tmp_path / "_helper_kinds.py").write_text(HELPER_KIND)
    monkeypatch.setattr(engine.actions, "__path__", [*engine.actions.__path__, str(tmp_path)])
    monkeypatch.delitem(sys.modules, "engine.actions._helper_kinds", raising=False)
    known = dict(engine.actions._KINDS)
    engine.actions._KINDS.clear()
    try:
        engine.actions._discover()  # as at import, into an empty registry
        found = dict(ACTIONS)
    finally:
        engine.actions._KINDS.clear()
        engine.actions._KINDS.update(known)
        sys.modules.pop("engine.actions._helper_kinds", None)
    assert found == known
    registered_from = {action.__module__.rpartition(".")[2] for action in found.values()}
    assert registered_from == modules - {"base"}
    assert all(ACTIONS[action.kind] is action for action in kinds_in(engine.actions.webhook))


def test_a_module_defines_the_kinds_with_a_kind_of_their_own_not_those_it_imports():
    assert kinds_in(engine.actions.suspend_sim) == [SuspendSim]  # not StatusChange, imported
    assert kinds_in(engine.actions._status) == []  # StatusChange names no kind
    assert kinds_in(engine.actions.base) == []


def test_registering_a_module_whose_kinds_are_known_adds_and_later_removes_nothing():
    with registered(engine.actions.webhook) as added:
        assert added == []
    assert ACTIONS["webhook"].__module__ == "engine.actions.webhook"


def _named(kind: object) -> type[Action]:
    return type("Renamed", (TagDevice,), {"kind": kind})


class Kindless(Action):
    summary = "names no kind"

    @classmethod
    async def run(cls, params, ctx):
        return "done"


class NoSummary(TagDevice):
    kind = "no_summary"
    summary = ""


class Unimplemented(Action):
    kind = "unimplemented"
    summary = "does nothing"


class NotTyped(TagDevice):
    kind = "not_typed"
    params_type = dict  # type: ignore[assignment]


class NeedsDevice(TagDevice):
    kind = "needs_device"
    needs = "device"


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (_named("TagDevice"), "Renamed: `kind` must be a snake_case name, got 'TagDevice'"),
        (_named("tag-device"), "Renamed: `kind` must be a snake_case name, got 'tag-device'"),
        (_named("2tag"), "Renamed: `kind` must be a snake_case name, got '2tag'"),
        (_named("tag_device!"), "Renamed: `kind` must be a snake_case name, got 'tag_device!'"),
        (_named(7), "Renamed: `kind` must be a snake_case name, got 7"),
        (Kindless, "Kindless: `kind` must be a snake_case name, got None"),
        (Unimplemented, "action kind 'unimplemented' leaves methods unimplemented: `run`?"),
        (NoSummary, "action kind 'no_summary' has no `summary` for the docs"),
        (NotTyped, "action kind 'not_typed': `params_type` must subclass ActionParams"),
        (NeedsDevice, "action kind 'needs_device': `needs` must be None, 'sim' or 'endpoint'"),
    ],
)
def test_a_kind_that_breaks_the_contract_is_refused_saying_what_to_fix(action, message):
    with pytest.raises(TypeError) as refused:
        register(action)
    assert str(refused.value) == message
    assert action not in ACTIONS.values()


def test_a_kind_without_a_summary_at_all_is_refused():
    class Unsummed(Action):
        kind = "unsummed"

        @classmethod
        async def run(cls, params, ctx):
            return "done"

    with pytest.raises(TypeError, match="'unsummed' has no `summary`"):
        register(Unsummed)


def test_a_kind_named_in_snake_case_with_digits_is_registered(tag_device):
    class Tag2Device(TagDevice):
        kind = "tag2_device"

    try:
        assert register(Tag2Device) is Tag2Device and ACTIONS["tag2_device"] is Tag2Device
    finally:
        engine.actions._KINDS.pop("tag2_device", None)


def test_only_the_webhook_calls_receivers_outside_emnify(tag_device):
    assert calling_out() == ("webhook",)


@pytest.mark.parametrize(
    ("kind", "target", "lane"),
    [
        ("suspend_sim", {"sim_id": 7, "endpoint_id": 3}, "sim:7"),
        ("suspend_sim", {"sim_id": None, "endpoint_id": 3}, "endpoint:3"),
        ("suspend_sim", {}, None),
        ("add_tags", {"sim_id": 7, "endpoint_id": 3}, "endpoint:3"),
        ("add_tags", {"sim_id": 7}, None),
        ("webhook", {"sim_id": 7, "endpoint_id": 3}, None),
        ("a_kind_no_longer_known", {"sim_id": 7, "endpoint_id": 3}, None),
    ],
)
def test_an_intent_runs_on_its_sims_lane_its_endpoints_or_its_own(kind, target, lane):
    assert lane_of(kind, target) == lane


def test_the_readme_table_of_actions_is_what_the_registry_says():
    text = README.read_text(encoding="utf-8")
    assert with_table(text) == text, "the README's actions table is stale: run `make docs`"


# Parameters as the outbox held them before they were typed (replay printed these): each
# reads back as its kind's type and is written back byte for byte.
WRITTEN_BEFORE = [
    ("log", '{"message":"endpoint truck-0001 blocked: SMS sent","level":"warning"}', LogLine),
    ("send_sms", '{"payload":"LIMIT_REACHED truck-0001"}', Sms),
    ("suspend_sim", "{}", None),
    (
        "webhook",
        '{"method":"POST","url":"https://hooks.example.com/emnify/ops","headers":{},'
        '"timeout":10.0,"body":{"text":"SIM 8988 (truck-0001): quota used up"}}',
        WebhookCall,
    ),
    (
        "webhook",
        '{"method":"GET","url":"${HOOK}/x?id=7","headers":{"Authorization":"Bearer ${T}"},'
        '"timeout":2.5,"url_origin":"${HOOK}"}',
        WebhookCall,
    ),
    (
        "send_sms",
        '{"payload":"REBOOT","source_address":"AcmeOps","source_address_type":{"id":208},'
        '"dcs":0,"expiry_date":"2026-01-01T00:00:00Z"}',
        Sms,
    ),
]


@pytest.mark.parametrize(("kind", "written", "typed"), WRITTEN_BEFORE)
def test_outbox_rows_written_before_typed_parameters_still_load(kind, written, typed):
    params = ACTIONS[kind].decode(orjson.loads(written))
    assert typed is None or isinstance(params, typed)
    assert orjson.dumps(params.to_json()).decode() == written


async def test_an_outbox_row_its_kind_cannot_read_fails_at_once_with_the_reason(
    tmp_path, simulator, sink
):
    # A row no version wrote (the store was edited by hand): nothing to call, nothing to
    # retry until the deadline, and the dispatcher goes on.
    rules = rules_from(tmp_path, "rules:\n  - {id: r, when: {type: 19}, actions: [log: {}]}\n")
    daemon = Daemon(engine_config(tmp_path, simulator), rules, TOKEN)
    unreadable = Intent("k-1", None, "r", 0, "webhook", {"method": "POST"}, {})
    delivered = Intent(
        "k-2", None, "r", 1, "webhook", {"method": "POST", "url": sink.base_url + "/hooks/x"}, {}
    )
    try:
        daemon.store.commit_batch(Batch(intents=[unreadable, delivered]), daemon.clock())
        await daemon.dispatcher.run_due()
        by_key = {i.idempotency_key: i for i in daemon.store.intents()}
    finally:
        await daemon.aclose()
    assert by_key["k-1"].status is IntentStatus.FAILED and by_key["k-1"].attempts == 0
    assert "the outbox holds parameters webhook cannot read" in str(by_key["k-1"].last_error)
    assert "url" in str(by_key["k-1"].last_error)
    assert by_key["k-2"].status is IntentStatus.DONE and len(sink.calls("x")) == 1


def test_sms_parameters_that_are_not_an_object_are_refused_as_unreadable():
    with pytest.raises(TypeError, match="expected an object, got list"):
        ACTIONS["send_sms"].decode(["REBOOT"])
