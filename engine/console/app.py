"""The console's routes: its pages under `/ui`, the JSON they show under `/api`.

Every page and its API twin read the same data function (`status`, `why` and `rules`'s
`collect`), so what a script reads is what a person sees. A page is complete without
JavaScript; the script only adds the live list (server-sent events) and its pause toggle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import orjson
import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.requests import Request
from starlette.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from engine.commands import parked, rules_cmd, silence_cmd, status, why
from engine.commands.tables import timestamp
from engine.config import UiSettings
from engine.console.auth import COOKIE, SESSION_SECONDS, Session, Sessions, csrf_matches
from engine.console.rates import Rates, chart
from engine.console.settings import OPERATOR, read_logins
from engine.durations import parse_duration
from engine.errors import ApiError
from engine.http.health import readiness
from engine.model import AuditRow, Batch, IntentStatus, Silence
from engine.silencing import parse_matcher
from engine.sources.streamer import STREAM_LAST_DELIVERY

if TYPE_CHECKING:
    from engine.services import ServiceContext

PATHS = ("/ui", "/api")
_STATIC = Path(__file__).with_name("static")
_STATIC_FILES = {"console.css": "text/css", "console.js": "text/javascript"}
_LIVE_EVERY = 1.0  # seconds between looks for new decisions
_LIST_LIMIT = 200
_ICCID_DIGITS = 18  # ICCIDs have 19 or 20 digits (18 without the check digit); endpoint ids fewer
_ACTIVITY_SPAN = timedelta(hours=24)  # the rules page's matches and actions
_log = structlog.get_logger(__name__)

_Page = Callable[[Request, Session], Awaitable[Any]]
_Press = Callable[[Request, Session, dict[str, str]], Awaitable[Any]]


def console_pages(
    settings: UiSettings, env: dict[str, str] | None = None
) -> Callable[[ServiceContext], list[Route]]:
    """What `HttpService(pages=...)` takes: the console's routes for the running daemon.
    The logins are read now (from `env`, by default the process's environment), so a
    console with none stops the start (EngineError)."""
    logins = read_logins(settings, env)

    def pages(context: ServiceContext) -> list[Route]:
        sessions = Sessions(logins, settings.login_attempts_per_minute)
        rates = Rates(context.metrics.registry)
        rates.sample(time.time())
        context.scheduler.add_job(
            lambda: rates.sample(time.time()),
            "interval",
            seconds=60,
            id="console-rates",
            replace_existing=True,
            coalesce=True,
            max_instances=1,
        )
        return _Console(context, sessions, rates).routes()

    return pages


class _Console:
    def __init__(self, context: ServiceContext, sessions: Sessions, rates: Rates) -> None:
        self.context = context
        self.sessions = sessions
        self.rates = rates
        self.templates = Environment(
            loader=PackageLoader("engine.console", "templates"),
            autoescape=select_autoescape(default=True),
        )
        self.templates.globals["step_lines"] = why.step_lines

    def routes(self) -> list[Route]:
        page, api, press = self._page, self._api, self._press
        return [
            Route("/ui", self._home, methods=["GET"]),
            Route("/ui/login", self._login_page, methods=["GET"]),
            Route("/ui/login", self._login, methods=["POST"]),
            Route("/ui/logout", press(self._logout, operator_only=False), methods=["POST"]),
            Route("/ui/static/{name}", self._static, methods=["GET"]),
            Route("/ui/overview", page("overview.html", self._overview), methods=["GET"]),
            Route("/ui/actions", page("actions.html", self._actions), methods=["GET"]),
            Route("/ui/events/{event_id:int}", page("trace.html", self._trace), methods=["GET"]),
            Route("/ui/sim", page("sim.html", self._sim), methods=["GET"]),
            Route("/ui/rules", page("rules.html", self._rules), methods=["GET"]),
            Route("/ui/silences", page("silences.html", self._silences), methods=["GET"]),
            Route("/ui/silences", press(self._add_silence), methods=["POST"]),
            Route("/ui/silences/{silence_id:int}/expire", press(self._expire), methods=["POST"]),
            Route("/ui/live", self._live, methods=["GET"]),
            Route("/ui/actions/{intent_id:int}/{verb}", press(self._change), methods=["POST"]),
            Route("/ui/guards/{rule_id}/resume", press(self._resume), methods=["POST"]),
            Route("/api/overview", api(self._overview), methods=["GET"]),
            Route("/api/actions", api(self._actions), methods=["GET"]),
            Route("/api/events/{event_id:int}", api(self._trace), methods=["GET"]),
            Route("/api/sim", api(self._sim), methods=["GET"]),
            Route("/api/actions/{intent_id:int}/{verb}", press(self._change), methods=["POST"]),
            Route("/api/guards/{rule_id}/resume", press(self._resume), methods=["POST"]),
            Route("/api/rules", api(self._rules), methods=["GET"]),
            Route("/api/silences", api(self._silences), methods=["GET"]),
            Route("/api/silences", press(self._add_silence), methods=["POST"]),
            Route("/api/silences/{silence_id:int}/expire", press(self._expire), methods=["POST"]),
        ]

    # -- who is asking ----------------------------------------------------------------------

    def _session(self, request: Request) -> Session | None:
        client = request.client.host if request.client else "unknown"
        return self.sessions.bearer(
            request.headers.get("authorization"), client
        ) or self.sessions.read(request.cookies.get(COOKIE))

    async def _home(self, request: Request) -> Response:
        target = "/ui/overview" if self._session(request) else "/ui/login"
        return RedirectResponse(target, status_code=303)

    async def _login_page(self, request: Request) -> Response:
        return self._render("login.html", None, {"form_token": self.sessions.login_form_token()})

    async def _login(self, request: Request) -> Response:
        client = request.client.host if request.client else "unknown"
        form = await _form(request)
        if not self.sessions.login_allowed(client):
            _log.warning("console login refused: too many failed attempts", client=client)
            return self._render(
                "login.html",
                None,
                {
                    "form_token": self.sessions.login_form_token(),
                    "error": "Too many attempts: wait a minute.",
                },
                status_code=429,
            )
        if not self.sessions.login_form_token_valid(form.get("form_token", "")):
            return Response("the login form is stale or forged: reload it", status_code=403)
        login = self.sessions.logins.login_of(form.get("password", ""))
        if login is None:
            self.sessions.login_failed(client)
            _log.info("console login failed", client=client)
            return self._render(
                "login.html",
                None,
                {"form_token": self.sessions.login_form_token(), "error": "Wrong password."},
                status_code=401,
            )
        session, cookie = self.sessions.open(login, client)
        _log.info("console login", who=session.who)
        answer = RedirectResponse("/ui/overview", status_code=303)
        answer.set_cookie(
            COOKIE,
            cookie,
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="strict",
            path="/",
            # Behind a TLS proxy the browser must never send it over plain HTTP.
            secure=_over_tls(request),
        )
        return answer

    async def _logout(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> dict[str, Any]:
        return {"logged_out": session.who}

    def _page(self, template: str, read: _Page) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return RedirectResponse("/ui/login", status_code=303)
            data = await read(request, session)
            if isinstance(data, Response):
                return data
            return self._render(template, session, {"data": data, "request": request})

        return page

    def _api(self, read: _Page) -> Callable[[Request], Awaitable[Response]]:
        async def api(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                return JSONResponse({"error": "log in, or send Authorization: Bearer"}, 401)
            data = await read(request, session)
            return data if isinstance(data, Response) else _json(data)

        return api

    def _press(
        self, act: _Press, *, operator_only: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """A button: a POST that needs a session, an operator, and (with a cookie) the
        session's CSRF token; what it did is logged with who pressed it."""

        async def pressed(request: Request) -> Response:
            is_api = request.url.path.startswith("/api/")
            client = request.client.host if request.client else "unknown"
            bearer = self.sessions.bearer(request.headers.get("authorization"), client)
            session = bearer or self.sessions.read(request.cookies.get(COOKIE))
            if session is None:
                return JSONResponse({"error": "not logged in"}, 401)
            form = await (_json_form(request) if is_api else _form(request))
            if bearer is None and not csrf_matches(
                session, request.headers.get("x-csrf-token") or form.get("csrf")
            ):
                _log.warning("console press refused: no valid CSRF token", who=session.who)
                return JSONResponse({"error": "missing or wrong CSRF token"}, 403)
            if operator_only and session.role != OPERATOR:
                return JSONResponse({"error": "only an operator may do this"}, 403)
            result = await act(request, session, form)
            _log.info(
                "console button pressed",
                who=session.who,
                at=timestamp(self.context.clock()),
                path=request.url.path,
            )
            if is_api:
                return result if isinstance(result, Response) else _json(result)
            if isinstance(result, Response) and result.status_code >= 400:
                problem = orjson.loads(bytes(result.body)).get("error", "refused")
                return self._render(
                    "error.html", session, {"error": problem}, status_code=result.status_code
                )
            if act == self._logout:
                answer = RedirectResponse("/ui/login", status_code=303)
                answer.delete_cookie(COOKIE, path="/")
                return answer
            back = form.get("back", "/ui/overview")
            return RedirectResponse(back if back.startswith("/ui/") else "/ui/overview", 303)

        return pressed

    # -- what the pages show ----------------------------------------------------------------

    async def _overview(self, request: Request, session: Session) -> dict[str, Any]:
        store = self.context.store
        data = status.collect(
            store, "the daemon's store", organisations=list(self.context.organisation_clients)
        )
        data["readiness"] = readiness(self.context).as_json()
        data["leading"] = self.context.leading
        data["latest"] = [_decision(row) for row in store.latest_audit_rows(30)]
        data["chart"] = chart(self.rates.minutes())
        data["source_health"] = _source_health(self.context, data)
        return data

    async def _actions(self, request: Request, session: Session) -> dict[str, Any]:
        wanted = request.query_params.get("status", "dead")
        try:
            chosen = IntentStatus(wanted) if wanted != "all" else None
        except ValueError:
            chosen = IntentStatus.DEAD
        intents = self.context.store.intents(chosen, limit=_LIST_LIMIT)
        return {
            "status": wanted,
            "statuses": ["all", *(s.value for s in IntentStatus)],
            "actions": [_action(i) for i in intents],
        }

    async def _trace(self, request: Request, session: Session) -> dict[str, Any]:
        event_id = int(request.path_params["event_id"])
        result: dict[str, Any] = why.collect(self.context.store, event_id=event_id)
        return result

    async def _sim(self, request: Request, session: Session) -> dict[str, Any]:
        given = request.query_params.get("q") or request.query_params.get("iccid") or ""
        wanted = given.strip()
        if not wanted:
            return {"sim": None, "events": [], "searched": ""}
        try:
            iccid, endpoints = await self._iccid_of(wanted)
        except ApiError as exc:
            found: dict[str, Any] = {"sim": None, "events": [], "problem": str(exc)}
            return found | {"searched": wanted}
        if iccid is None:
            return {"sim": None, "events": [], "searched": wanted, "endpoints": endpoints}
        result: dict[str, Any] = why.collect(self.context.store, iccid=iccid)
        return result | {"searched": wanted, "endpoints": endpoints}

    async def _iccid_of(self, wanted: str) -> tuple[str | None, list[dict[str, Any]]]:
        """The ICCID a search names, and the endpoints it found on the way. A long number is
        an ICCID; a short one an endpoint id, and anything else a part of an endpoint's name,
        both asked of the API (the store keeps ids, not names). Several endpoints by that
        name: no ICCID, the caller lists them to choose from."""
        if wanted.isdigit() and len(wanted) >= _ICCID_DIGITS:
            return wanted, []
        if wanted.isdigit():
            try:
                endpoints = [await self.context.client.get_endpoint(int(wanted))]
            except ApiError as exc:
                if exc.status != 404:
                    raise
                endpoints = []
        else:
            endpoints = await self.context.client.endpoints_named(wanted)
        listed = [_endpoint(e) for e in endpoints]
        if len(listed) == 1 and listed[0]["iccid"]:
            return listed[0]["iccid"], listed
        return None, listed

    async def _rules(self, request: Request, session: Session) -> dict[str, Any]:
        pipeline = self.context.pipeline
        rules = list(pipeline.rules.rules)
        listed = rules_cmd.collect(rules, self.context.store, pipeline.max_actions)
        by_id = {rule.id: rule for rule in rules}
        day = self.context.store.rule_activity(self.context.clock() - _ACTIVITY_SPAN)
        activity = {row["rule_id"]: row for row in day}
        for entry in listed:
            done = activity.get(entry["rule"], {})
            entry["matches_24h"] = done.get("matches", 0)
            entry["actions_24h"] = done.get("actions", 0)
            entry["last_fired"] = timestamp(done.get("last_fired"))
            rule = by_id.get(entry["rule"])
            entry["where"] = str(rule.where) if rule is not None else None
            entry["yaml"] = _rule_text(rule.where) if rule is not None else None
            entry["stopped"] = "(guard)" in entry["mode"] or "held" in entry["mode"]
        return {"rules": listed}

    async def _silences(self, request: Request, session: Session) -> dict[str, Any]:
        now = self.context.clock()
        found = self.context.store.silences(now - timedelta(days=1))
        return {
            "silences": [
                {**silence_cmd.as_json(s), "state": silence_cmd.state(s, now)} for s in found
            ]
        }

    # -- what the buttons do ----------------------------------------------------------------

    async def _change(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response | dict[str, Any]:
        """Retry or discard a dead letter; release or discard a held action."""
        verb = request.path_params["verb"]
        by = f"by {session.who} in the console"  # the audit row has the time
        outcomes = {
            "retry": ("requeued", f"queued again {by}", IntentStatus.DEAD),
            "release": ("released", f"released {by}", IntentStatus.HELD),
            "discard": ("discarded", f"discarded {by}", IntentStatus.DEAD),
        }
        if verb not in outcomes:
            return JSONResponse({"error": f"no such action: {verb}"}, 404)
        outcome, detail, status = outcomes[verb]
        intent_id = int(request.path_params["intent_id"])
        if verb == "discard":
            intent = self.context.store.get_intent(intent_id)
            if intent is not None and intent.status is IntentStatus.HELD:
                status = IntentStatus.HELD
        changed, refused = parked.change_intents(
            self.context.store, [intent_id], outcome, detail, status=status
        )
        if changed:
            self.context.wake_dispatcher()
        return {outcome: changed, f"not_{status.value}": refused}

    async def _resume(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response | dict[str, Any]:
        rule_id = request.path_params["rule_id"]
        result = self.context.store.resume_rule(
            rule_id, now=self.context.clock(), release_held=True, by=f"{session.who} in the console"
        )
        if result is None:
            return JSONResponse({"error": f"{rule_id} was not stopped by a guard"}, 404)
        self.context.wake_dispatcher()
        return {"resumed": rule_id, "released": result.released}

    async def _add_silence(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response | dict[str, Any]:
        comment = form.get("comment", "").strip()
        if not comment:
            return JSONResponse({"error": "a silence needs a comment saying why"}, 400)
        try:
            matchers = tuple(
                parse_matcher(part)
                for part in form.get("match", "").replace(",", "\n").split("\n")
                if part.strip()
            )
            length = parse_duration(form.get("length", "2h"))
        except ValueError as error:
            return JSONResponse({"error": str(error)}, 400)
        if not matchers:
            return JSONResponse({"error": "name what to silence, e.g. iccid=8988..."}, 400)
        if length.total_seconds() <= 0:
            return JSONResponse({"error": "a silence must last longer than zero, e.g. 2h"}, 400)
        now = self.context.clock()
        added = self.context.store.add_silence(
            Silence(
                matchers=matchers,
                comment=comment,
                created_by=session.who,
                created_at=now,
                ends_at=now + length,
            )
        )
        shown = silence_cmd.as_json(added)
        self._audit(None, "silence_added", f"silence #{added.id} added by {session.who}: {comment}")
        return shown

    async def _expire(
        self, request: Request, session: Session, form: dict[str, str]
    ) -> Response | dict[str, Any]:
        silence_id = int(request.path_params["silence_id"])
        ended = self.context.store.expire_silence(silence_id, session.who, self.context.clock())
        if ended is None:
            return JSONResponse({"error": f"no silence #{silence_id}"}, 404)
        self._audit(None, "silence_expired", f"silence #{silence_id} expired by {session.who}")
        return silence_cmd.as_json(ended)

    def _audit(self, rule_id: str | None, outcome: str, detail: str) -> None:
        """A button press the store has no audit row of its own for, in the audit log."""
        row = AuditRow(event_id=None, rule_id=rule_id, action=None, outcome=outcome, detail=detail)
        self.context.store.commit_batch(Batch(audit=[row]), self.context.clock())

    # -- live decisions ---------------------------------------------------------------------

    async def _live(self, request: Request) -> Response:
        if self._session(request) is None:
            return JSONResponse({"error": "not logged in"}, 401)
        store = self.context.store

        async def stream() -> AsyncIterator[bytes]:
            latest = store.latest_audit_rows(1)
            seen = latest[0]["id"] if latest else 0
            yield b"retry: 2000\n\n"
            while not await request.is_disconnected():
                rows = [r for r in store.latest_audit_rows(100) if r["id"] > seen]
                for row in reversed(rows):
                    seen = max(seen, row["id"])
                    yield b"data: " + orjson.dumps(_decision(row)) + b"\n\n"
                await asyncio.sleep(_LIVE_EVERY)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def _static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC_FILES:
            return Response("not found", status_code=404)
        return FileResponse(_STATIC / name, media_type=_STATIC_FILES[name])

    def _render(
        self,
        template: str,
        session: Session | None,
        values: dict[str, Any],
        status_code: int = 200,
    ) -> Response:
        html = self.templates.get_template(template).render(
            session=session, operator=session is not None and session.role == OPERATOR, **values
        )
        answer = HTMLResponse(html, status_code=status_code)
        answer.headers["content-security-policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; frame-ancestors 'none'"
        )
        answer.headers["x-content-type-options"] = "nosniff"
        answer.headers["cache-control"] = "no-store"
        return answer


def _source_health(context: ServiceContext, found: dict[str, Any]) -> list[Any]:
    """One line per way events come in (the poll, the Data Streamer's push; per organisation
    with `organisations:`) and one for the API they and the actions depend on: what the
    on-call person checks first. A source this instance does not run still gets its line,
    saying so, as a push may arrive elsewhere. `found`: what `status.collect` read."""
    running = {source.name for source in context.sources}
    lines: list[dict[str, Any]] = []
    polled = found.get("organisations") or {"": {"last_poll": found["last_poll"]}}
    for organisation, state in polled.items():
        whose = f" ({organisation})" if organisation else ""
        poll: dict[str, Any] = {"name": f"Event API poll{whose}", "running": "poller" in running}
        last_poll = state.get("last_poll")
        if last_poll is not None:
            poll |= {
                "last": last_poll["at"],
                "ok": last_poll.get("ok"),
                "detail": _poll_detail(last_poll),
            }
        push: dict[str, Any] = {
            "name": f"Data Streamer push{whose}",
            "running": "data_streamer" in running,
        }
        key = f"{STREAM_LAST_DELIVERY}:{organisation}" if organisation else STREAM_LAST_DELIVERY
        delivered = context.store.get_meta(key)
        if delivered:
            push |= {"last": timestamp(datetime.fromisoformat(delivered)), "ok": True}
        lines += [poll, push]
    lines.append(_api_reachability(context))
    for line in lines:
        line["state"] = _state_word(line)
    return lines


def _state_word(line: dict[str, Any]) -> str:
    if line.get("ok") is True:
        return str(line.get("ok_word", "ok"))
    if line.get("ok") is False:
        return str(line.get("fail_word", "failing"))
    return "nothing yet" if line["running"] else "not run here"


def _poll_detail(last_poll: dict[str, Any]) -> str:
    if last_poll.get("ok"):
        return f"{last_poll.get('fetched', 0)} events fetched"
    return f"failed: {last_poll.get('error') or 'unknown error'}"


def _api_reachability(context: ServiceContext) -> dict[str, Any]:
    line: dict[str, Any] = {
        "name": f"emnify API {context.api_url}",
        "running": True,
        "ok_word": "reachable",
        "fail_word": "unreachable",
    }
    last = context.metrics.last_api
    if last is None:
        return line | {"detail": "not contacted yet"}
    age = time.monotonic() - last.at
    line["last"] = timestamp(context.clock() - timedelta(seconds=age))
    return line | {
        "ok": last.trouble is None,
        "detail": last.trouble or f"answered HTTP {last.status}",
    }


def _endpoint(resource: dict[str, Any]) -> dict[str, Any]:
    sim = resource.get("sim") or {}
    return {"id": resource.get("id"), "name": resource.get("name"), "iccid": sim.get("iccid")}


def _decision(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "event_id": row["event_id"],
        "iccid": row.get("iccid"),
        "at": timestamp(row["at"]),
        "rule": row["rule_id"],
        "action": row["action"],
        "outcome": row["outcome"],
        "detail": why.one_time_format(row["detail"]),
    }


def _action(intent: Any) -> dict[str, Any]:
    return {
        "id": intent.id,
        "event_id": intent.event_id,
        "rule": intent.rule_id,
        "action": intent.kind,
        "status": intent.status.value,
        "target": {k: v for k, v in intent.target.items() if v is not None},
        "attempts": intent.attempts,
        "created": timestamp(intent.created_at),
        "due_at": timestamp(intent.due_at),
        "last_error": intent.last_error,
    }


def _rule_text(where: Any) -> str | None:
    """The rule's own lines of its YAML file, from its `- id:` line to the next rule's, as
    written (a `${VAR}` stays unexpanded)."""
    if where.line is None:
        return None
    try:
        lines = Path(where.file).read_text().splitlines()
    except OSError:
        return None
    start = where.line - 1
    first = lines[start] if start < len(lines) else ""
    indent = len(first) - len(first.lstrip(" -"))
    end = start + 1
    while end < len(lines):
        line = lines[end]
        stripped = line.lstrip(" ")
        if stripped and len(line) - len(stripped) < indent:
            break
        if stripped.startswith("- ") and len(line) - len(stripped) <= indent - 2:
            break
        end += 1
    return "\n".join(lines[start:end]).rstrip()


def _over_tls(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


async def _json_form(request: Request) -> dict[str, str]:
    """An API POST's JSON object (may be empty), its values as text."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form's fields (the only kind the console's forms send)."""
    body = (await request.body()).decode("utf-8", "replace")
    return {key: values[-1] for key, values in parse_qs(body).items()}


def _json(data: Any) -> Response:
    return Response(orjson.dumps(data), media_type="application/json")
