"""The web console over loopback HTTP: who may log in, what a viewer and an operator may do,
CSRF, the login's rate limit, the bearer-token API, and the buttons' effect on the store."""

from __future__ import annotations

from dataclasses import replace

import httpx
import pytest

from engine.clock import system_clock
from engine.config import UiSettings, UiUser, load_config
from engine.console.app import console_pages
from engine.daemon import Daemon
from engine.errors import ConfigError, EngineError
from engine.http.service import HttpService
from engine.http.settings import HttpSettings
from engine.model import IntentStatus
from engine.simulator import FaultRule
from engine.sources.streamer import STREAM_LAST_DELIVERY

from console_setup import (
    ALICE_LOGIN,
    BOB_LOGIN,
    OPERATOR_LOGIN,
    RULES,
    VIEWER_LOGIN,
    logged_in,
    running_console,
)
from helpers import TOKEN, engine_config, eventually, rules_from, running_daemon


def _dead(console) -> list[int]:
    return [i.id for i in console.daemon.store.intents(IntentStatus.DEAD)]


def _held(console) -> list[int]:
    return [i.id for i in console.daemon.store.intents(IntentStatus.HELD)]


async def test_an_operator_retries_a_dead_letter_and_the_audit_log_names_who(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, OPERATOR_LOGIN)
        dead = _dead(console)
        assert dead
        page = await client.get(console.url + "/ui/actions?status=dead")
        assert f"/ui/actions/{dead[0]}/retry" in page.text
        pressed = await client.post(
            console.url + f"/ui/actions/{dead[0]}/retry",
            data={"csrf": csrf, "back": "/ui/actions?status=dead"},
        )
        assert pressed.status_code == 303
        await eventually(
            lambda: console.daemon.store.get_intent(dead[0]).status is IntentStatus.DONE
        )
        rows = console.daemon.store.audit_rows(
            event_id=console.daemon.store.get_intent(dead[0]).event_id
        )
        requeued = [r for r in rows if r["outcome"] == "requeued"]
        assert requeued and "operator@127.0.0.1" in requeued[0]["detail"]


async def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, OPERATOR_LOGIN)
        dead = _dead(console)
        for form in ({}, {"csrf": "forged"}):
            refused = await client.post(console.url + f"/ui/actions/{dead[0]}/discard", data=form)
            assert refused.status_code == 403
        assert _dead(console) == dead


async def test_a_viewer_sees_no_buttons_and_may_not_press_one(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, VIEWER_LOGIN)
        dead = _dead(console)
        actions = await client.get(console.url + "/ui/actions?status=dead")
        overview = await client.get(console.url + "/ui/overview")
        assert str(dead[0]) in actions.text
        assert '<button type="submit">Retry' not in actions.text
        assert "guarded" in overview.text and "Resume" not in overview.text
        refused = await client.post(
            console.url + f"/ui/actions/{dead[0]}/retry", data={"csrf": csrf}
        )
        assert refused.status_code == 403
        assert _dead(console) == dead


async def test_the_session_cookie_is_signed_httponly_and_samesite_strict(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        page = await client.get(console.url + "/ui/login")
        token = page.text.split('name="form_token" value="')[1].split('"')[0]
        answer = await client.post(
            console.url + "/ui/login", data={"form_token": token, "password": VIEWER_LOGIN}
        )
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        value = client.cookies["engine_console"]
        tampered = httpx.AsyncClient(cookies={"engine_console": value[:-2] + "xx"})
        async with tampered:
            assert (await tampered.get(console.url + "/ui/overview")).status_code == 303
        assert (await client.get(console.url + "/ui/overview")).status_code == 200


async def test_logins_are_limited_to_five_failures_a_minute(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        token = (await client.get(console.url + "/ui/login")).text
        token = token.split('name="form_token" value="')[1].split('"')[0]
        codes = [
            (
                await client.post(
                    console.url + "/ui/login", data={"form_token": token, "password": "guess"}
                )
            ).status_code
            for _ in range(6)
        ]
        assert codes == [401] * 5 + [429]
        right = await client.post(
            console.url + "/ui/login", data={"form_token": token, "password": OPERATOR_LOGIN}
        )
        assert right.status_code == 429


async def test_scripts_read_and_act_through_the_api_with_a_bearer_token(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        url = console.url
        assert (await client.get(url + "/api/actions?status=dead")).status_code == 401
        viewer = {"authorization": f"Bearer {VIEWER_LOGIN}"}
        operator = {"authorization": f"Bearer {OPERATOR_LOGIN}"}
        listed = (await client.get(url + "/api/actions?status=dead", headers=viewer)).json()
        dead = listed["actions"][0]
        trace = (await client.get(url + f"/api/events/{dead['event_id']}", headers=viewer)).json()
        assert {d["rule"] for d in trace["events"][0]["decisions"]} == {"quota"}
        retry = f"/api/actions/{dead['id']}/retry"
        assert (await client.post(url + retry, headers=viewer)).status_code == 403
        done = (await client.post(url + retry, headers=operator)).json()
        assert done == {"requeued": [dead["id"]], "not_dead": []}
        resumed = (await client.post(url + "/api/guards/guarded/resume", headers=operator)).json()
        assert resumed["resumed"] == "guarded"
        (row,) = [r for r in console.daemon.store.latest_audit_rows(5) if r["outcome"] == "resumed"]
        assert (row["rule_id"], row["detail"]) == (
            "guarded",
            "resumed by operator@127.0.0.1 in the console; 1 held actions released",
        )
        overview = (await client.get(url + "/api/overview", headers=viewer)).json()
        assert "guarded" not in [g["rule"] for g in overview["guards"] if g["mode"]]
        assert overview["readiness"]["checks"]["store"]["ok"] is True


async def test_the_console_is_off_unless_enabled(tmp_path, simulator):
    service = HttpService(HttpSettings(port=0))
    service.bind()
    config = engine_config(tmp_path, simulator)
    daemon = Daemon(config, rules_from(tmp_path, RULES), TOKEN, services=[service])
    async with running_daemon(daemon), httpx.AsyncClient() as client:
        assert (await client.get(service.base_url + "/ui/login")).status_code == 404
        assert (await client.get(service.base_url + "/api/overview")).status_code == 404


def test_an_enabled_console_without_a_login_stops_the_start():
    with pytest.raises(EngineError, match="EVENT_ENGINE_UI_OPERATOR_TOKEN"):
        console_pages(UiSettings(enabled=True), env={})
    assert not replace(UiSettings()).enabled


async def test_the_rules_page_shows_each_rule_with_its_yaml_and_file_line(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, OPERATOR_LOGIN)
        page = (await client.get(console.url + "/ui/rules")).text
        assert "rules.yaml:3" in page and "shadow (guard)" in page
        assert "max_actions: {count: 1, within: 10m}" in page
        assert "/ui/guards/guarded/resume" in page and "/ui/guards/quota/resume" not in page
        listed = (
            await client.get(
                console.url + "/api/rules", headers={"authorization": f"Bearer {VIEWER_LOGIN}"}
            )
        ).json()["rules"]
        quota = next(r for r in listed if r["rule"] == "quota")
        assert quota["yaml"].splitlines() == [
            "  - id: quota",
            "    when: {type: 19}",
            '    condition: {"!=": [{"var": "sim.iccid"}, null]}',
            "    threshold: {count: 1, within: 10m, per: sim.iccid}",
            "    actions: [{suspend_sim: {}}]",
        ]


async def test_the_rules_page_counts_each_rules_matches_and_actions_over_a_day(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, VIEWER_LOGIN)
        page = (await client.get(console.url + "/ui/rules")).text
        listed = (await client.get(console.url + "/api/rules")).json()["rules"]
        quota = next(r for r in listed if r["rule"] == "quota")
        assert (quota["matches_24h"], quota["actions_24h"]) == (1, 1)
        assert quota["last_fired"] is not None and quota["last_fired"].endswith("Z")
        guarded = next(r for r in listed if r["rule"] == "guarded")
        assert guarded["matches_24h"] == 2
        assert f"Last 24 h: 1 matches, 1 actions · last fired {quota['last_fired']}" in page


async def test_the_overview_gives_the_poll_the_push_and_the_api_a_line_each(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, VIEWER_LOGIN)

        async def lines() -> dict[str, dict]:
            found = (await client.get(console.url + "/api/overview")).json()["source_health"]
            return {line["name"].split()[0]: line for line in found}

        async def polled_and_answered() -> bool:
            now = await lines()
            return now["Event"]["state"] == "ok" and now["emnify"]["state"] == "reachable"

        await eventually(polled_and_answered)
        first = await lines()
        assert first["Event"]["last"].endswith("Z") and "events fetched" in first["Event"]["detail"]
        assert first["Data"]["state"] == "not run here" and "last" not in first["Data"]

        simulator.state.set_faults([FaultRule.parse({"path": "^/api/v1/event", "kind": "503"})])

        async def unreachable() -> bool:
            now = await lines()
            return now["emnify"]["state"] == "unreachable" and now["Event"]["state"] == "failing"

        await eventually(unreachable)
        page = (await client.get(console.url + "/ui/overview")).text
        assert "answered HTTP 503" in page and "unreachable" in page

        delivered = "2026-01-02T03:04:05+00:00"
        console.daemon.store.set_meta(STREAM_LAST_DELIVERY, delivered)
        push = (await lines())["Data"]
        assert (push["state"], push["last"]) == ("ok", "2026-01-02T03:04:05Z")


async def test_a_sim_is_found_by_its_endpoint_id_and_by_its_endpoint_name(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, VIEWER_LOGIN)
        sim = simulator.state.sims()[0]  # the SIM whose quota event the `quota` rule judged
        endpoint = next(e for e in simulator.state.endpoints() if e["sim"]["id"] == sim["id"])

        async def found(query: str) -> dict:
            answer = await client.get(console.url + "/api/sim", params={"q": query})
            return answer.json()

        for query in (str(endpoint["id"]), endpoint["name"], endpoint["name"].upper()):
            result = await found(query)
            assert result["sim"] == sim["iccid"], query
            assert result["endpoints"] == [
                {"id": endpoint["id"], "name": endpoint["name"], "iccid": sim["iccid"]}
            ]
            assert any(d["rule"] == "quota" for e in result["events"] for d in e["decisions"])

        kind = endpoint["name"].split("-")[0]  # e.g. "tracker": a part of several names
        several = await found(kind)
        assert several["sim"] is None and len(several["endpoints"]) > 1
        assert sim["iccid"] in {e["iccid"] for e in several["endpoints"]}
        page = (await client.get(console.url + "/ui/sim", params={"q": kind})).text
        assert f'href="/ui/sim?q={sim["iccid"]}"' in page

        for unknown in ("999999", "no-such-device"):
            nothing = await found(unknown)
            assert (nothing["sim"], nothing["endpoints"]) == (None, [])
        page = (await client.get(console.url + "/ui/sim", params={"q": "no-such-device"})).text
        assert "No endpoint with that id or name." in page


async def test_an_operator_adds_a_silence_with_a_comment_and_expires_it(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, OPERATOR_LOGIN)
        form = {"csrf": csrf, "match": "rule=quota", "length": "1h", "back": "/ui/silences"}
        refused = await client.post(console.url + "/ui/silences", data={**form, "comment": " "})
        assert refused.status_code == 400 and "comment" in refused.text
        added = await client.post(
            console.url + "/ui/silences", data={**form, "comment": "maintenance"}
        )
        assert added.status_code == 303
        (silence,) = console.daemon.store.silences(system_clock())
        assert silence.created_by == "operator@127.0.0.1" and silence.comment == "maintenance"
        page = (await client.get(console.url + "/ui/silences")).text
        assert "maintenance" in page and f"/ui/silences/{silence.id}/expire" in page
        await client.post(
            console.url + f"/ui/silences/{silence.id}/expire",
            data={"csrf": csrf, "back": "/ui/silences"},
        )
        assert console.daemon.store.silences(system_clock()) == []
        pressed = [
            (r["outcome"], r["detail"])
            for r in console.daemon.store.latest_audit_rows(10)
            if r["outcome"].startswith("silence_")
        ]
        assert pressed == [
            ("silence_expired", f"silence #{silence.id} expired by operator@127.0.0.1"),
            ("silence_added", f"silence #{silence.id} added by operator@127.0.0.1: maintenance"),
        ]


async def test_wrong_bearer_tokens_count_as_failed_logins(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        url = console.url + "/api/overview"
        for _ in range(5):
            wrong = await client.get(url, headers={"authorization": "Bearer guess"})
            assert wrong.status_code == 401
        right = await client.get(url, headers={"authorization": f"Bearer {VIEWER_LOGIN}"})
        assert right.status_code == 401


async def test_the_session_cookie_is_secure_behind_a_tls_proxy(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        page = await client.get(console.url + "/ui/login")
        token = page.text.split('name="form_token" value="')[1].split('"')[0]
        answer = await client.post(
            console.url + "/ui/login",
            data={"form_token": token, "password": VIEWER_LOGIN},
            headers={"x-forwarded-proto": "https"},
        )
        assert "secure" in answer.headers["set-cookie"].lower()


async def test_the_trace_shows_the_values_a_rule_read_and_its_threshold_count(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, VIEWER_LOGIN)
        iccid = simulator.state.sims()[0]["iccid"]
        (row,) = [
            r for r in console.daemon.store.audit_rows(iccid=iccid) if r["rule_id"] == "quota"
        ][:1]
        trace = (await client.get(console.url + f"/api/events/{row['event_id']}")).json()
        (matched,) = [d for d in trace["events"][0]["decisions"] if d["outcome"] == "matched"]
        assert matched["steps"]["when"] == {"type": "19 (Quota used up)"}
        assert matched["steps"]["condition"] == {"sim.iccid": iccid}
        assert matched["steps"]["threshold"]["count"] == 1
        page = (await client.get(console.url + f"/ui/events/{row['event_id']}")).text
        assert f"<dt>condition read</dt><dd>sim.iccid={iccid}</dd>" in page
        assert f"<dd>1 of 1 within 10m for sim.iccid={iccid}</dd>" in page


async def test_the_trace_shows_the_guard_count_that_held_an_action(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, VIEWER_LOGIN)
        (held,) = console.daemon.store.intents(IntentStatus.HELD)
        page = (await client.get(console.url + f"/ui/events/{held.event_id}")).text
        assert (
            "<dt>guard (rule)</dt><dd>2 destructive actions within 10m, at most 1; held</dd>"
            in page
        )


async def test_an_operator_releases_one_held_action_and_it_runs(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, OPERATOR_LOGIN)
        (held,) = _held(console)
        page = await client.get(console.url + "/ui/actions?status=held")
        assert f"/ui/actions/{held}/release" in page.text
        pressed = await client.post(
            console.url + f"/ui/actions/{held}/release",
            data={"csrf": csrf, "back": "/ui/actions?status=held"},
        )
        assert pressed.status_code == 303
        await eventually(lambda: console.daemon.store.get_intent(held).status is IntentStatus.DONE)
        event_id = console.daemon.store.get_intent(held).event_id
        (released,) = [
            r
            for r in console.daemon.store.audit_rows(event_id=event_id)
            if r["outcome"] == "released"
        ]
        assert released["detail"] == "released by operator@127.0.0.1 in the console"
        assert released["intent_id"] == held and released["at"] is not None


async def test_held_actions_are_released_or_discarded_over_the_api_by_an_operator_only(
    tmp_path, simulator
):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        url = console.url
        viewer = {"authorization": f"Bearer {VIEWER_LOGIN}"}
        operator = {"authorization": f"Bearer {OPERATOR_LOGIN}"}
        (held,) = _held(console)
        listed = (await client.get(url + "/api/actions?status=held", headers=viewer)).json()
        assert [a["id"] for a in listed["actions"]] == [held]
        refused = await client.post(url + f"/api/actions/{held}/release", headers=viewer)
        assert refused.status_code == 403 and _held(console) == [held]
        discarded = await client.post(url + f"/api/actions/{held}/discard", headers=operator)
        assert discarded.json() == {"discarded": [held], "not_held": []}
        assert console.daemon.store.get_intent(held).status is IntentStatus.DISCARDED
        again = await client.post(url + f"/api/actions/{held}/release", headers=operator)
        assert again.json() == {"released": [], "not_held": [held]}


async def test_a_viewer_gets_no_release_button(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, VIEWER_LOGIN)
        (held,) = _held(console)
        page = await client.get(console.url + "/ui/actions?status=held")
        assert f'data-id="{held}"' in page.text and "/release" not in page.text
        refused = await client.post(
            console.url + f"/ui/actions/{held}/release", data={"csrf": csrf}
        )
        assert refused.status_code == 403 and _held(console) == [held]


# -- logins by name (`ui.users`) --------------------------------------------------------------


async def test_a_named_operators_retry_is_audited_with_the_name(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, ALICE_LOGIN)
        (dead, *_) = _dead(console)
        pressed = await client.post(
            console.url + f"/ui/actions/{dead}/retry",
            data={"csrf": csrf, "back": "/ui/actions?status=dead"},
        )
        assert pressed.status_code == 303
        event_id = console.daemon.store.get_intent(dead).event_id
        (requeued,) = [
            r
            for r in console.daemon.store.audit_rows(event_id=event_id)
            if r["outcome"] == "requeued"
        ]
        assert requeued["detail"] == "queued again by alice (operator)@127.0.0.1 in the console"


async def test_a_named_users_bearer_token_carries_the_name(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        alice = {"authorization": f"Bearer {ALICE_LOGIN}"}
        resumed = await client.post(console.url + "/api/guards/guarded/resume", headers=alice)
        assert resumed.json()["resumed"] == "guarded"
        (row,) = [r for r in console.daemon.store.latest_audit_rows(5) if r["outcome"] == "resumed"]
        assert row["detail"].startswith("resumed by alice (operator)@127.0.0.1 in the console")


async def test_a_named_viewer_gets_no_buttons_and_may_not_press_one(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        csrf = await logged_in(client, console.url, BOB_LOGIN)
        dead = _dead(console)
        actions = await client.get(console.url + "/ui/actions?status=dead")
        assert str(dead[0]) in actions.text and "bob (viewer)" in actions.text
        assert '<button type="submit">Retry' not in actions.text
        refused = await client.post(
            console.url + f"/ui/actions/{dead[0]}/retry", data={"csrf": csrf}
        )
        assert refused.status_code == 403 and _dead(console) == dead


async def test_the_shared_role_logins_keep_working_beside_named_users(tmp_path, simulator):
    async with running_console(tmp_path, simulator) as console, httpx.AsyncClient() as client:
        await logged_in(client, console.url, OPERATOR_LOGIN)
        page = await client.get(console.url + "/ui/overview")
        assert '<span class="who">operator</span>' in page.text


def _config_with_users(tmp_path, users: str):
    path = tmp_path / "config.yaml"
    path.write_text(f"ui:\n  enabled: true\n  users:\n{users}", encoding="utf-8")
    return path


def test_a_users_literal_token_is_refused_at_load_naming_the_key(tmp_path):
    path = _config_with_users(
        tmp_path,
        '    - {name: alice, role: operator, token: "${UI_ALICE_TOKEN}"}\n'
        "    - name: bob\n"
        "      role: viewer\n"
        "      token: hunter2-in-the-file\n",
    )
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert f"{path}:7" in str(error.value)
    assert "`ui.users[1].token` must reference an environment variable" in str(error.value)
    assert "hunter2" not in str(error.value)


def test_users_are_read_from_the_config_with_their_tokens_from_env_or_file(tmp_path):
    (tmp_path / "ui-bob").write_text("bob-secret-token\n", encoding="utf-8")
    path = _config_with_users(
        tmp_path,
        "    - name: alice\n"
        "      role: operator\n"
        "      token: ${UI_ALICE_TOKEN}\n"
        "    - {name: bob, role: viewer, token_file: ui-bob}\n",
    )
    ui = load_config(path).ui
    assert [(u.name, u.role) for u in ui.users] == [("alice", "operator"), ("bob", "viewer")]
    console_pages(ui, env={"UI_ALICE_TOKEN": "alice-secret-token"})  # no error: both read


def test_two_users_with_one_name_are_a_config_error(tmp_path):
    path = _config_with_users(
        tmp_path,
        '    - {name: alice, role: operator, token: "${A}"}\n'
        '    - {name: alice, role: viewer, token: "${B}"}\n',
    )
    with pytest.raises(ConfigError, match=r":5: two console users are named `alice`"):
        load_config(path)


def test_two_logins_with_one_token_are_a_config_error():
    users = (
        UiUser(name="alice", role="operator", token_reference="${A}"),
        UiUser(name="bob", role="viewer", token_reference="${B}"),
    )
    env = {"A": "one-token-for-two", "B": "one-token-for-two"}
    with pytest.raises(ConfigError, match="`bob` has the same token as user `alice`"):
        console_pages(UiSettings(enabled=True, users=users), env=env)
    env = {"A": "shared", "EVENT_ENGINE_UI_OPERATOR_TOKEN": "shared"}
    with pytest.raises(ConfigError, match="`alice` has the same token as the shared operator"):
        console_pages(UiSettings(enabled=True, users=users[:1]), env=env)


def test_a_user_whose_variable_is_unset_stops_the_start_naming_the_user():
    users = (UiUser(name="alice", role="operator", token_reference="${UI_ALICE_TOKEN}"),)
    with pytest.raises(ConfigError, match=r"no token for console user `alice`.*UI_ALICE_TOKEN"):
        console_pages(UiSettings(enabled=True, users=users), env={})


def test_a_user_needs_a_role_and_a_token(tmp_path):
    path = _config_with_users(tmp_path, '    - {name: alice, token: "${A}"}\n')
    with pytest.raises(ConfigError, match=r"`ui.users\[0\]` needs `role`"):
        load_config(path)
    path = _config_with_users(tmp_path, "    - {name: alice, role: operator}\n")
    with pytest.raises(ConfigError, match="needs one of `token` and `token_file`"):
        load_config(path)
