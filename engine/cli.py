"""`event-engine`: every command. Thin: parse arguments, call into the package, set the exit
code. Expected problems print one clear message and exit 1, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from engine import __version__
from engine.errors import EngineError, RuleSetError

EXIT_OK = 0
EXIT_FAILED = 1

# Further commands live in their own modules, each with `register(subparsers)` that adds its
# parsers and sets `handler` (a function of the parsed args returning the exit code).
_COMMAND_MODULES: list[str] = [
    "engine.commands.status",
    "engine.commands.why",
    "engine.commands.test_cmd",
    "engine.commands.rules_cmd",
    "engine.commands.dead_letters",
    "engine.commands.held",
    "engine.commands.types_cmd",
    "engine.commands.store_cmd",
    "engine.commands.silence_cmd",
]

_DESCRIPTION = """\
React to emnify system events with rules written in YAML.

The engine polls emnify's Event API, matches each event against your rules, and carries out
their actions: suspend or activate a SIM, disable or enable an endpoint, send an SMS, call a
webhook, or log. Start with `event-engine demo`: it runs the engine against a built-in
simulator, no emnify account needed.
"""


def _duration(text: str) -> timedelta:
    from engine.durations import parse_duration

    try:
        return parse_duration(text if not text.isdigit() else f"{text}s")
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-c",
        "--config",
        type=Path,
        metavar="FILE",
        help="the config file (see config.example.yaml); without it, defaults apply",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="event-engine",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="run the daemon against the emnify API",
        description="Poll the Event API, match the rules and act, until SIGTERM or Ctrl-C. "
        "The application token comes from $EMNIFY_APPLICATION_TOKEN (or the config's "
        "api.application_token / api.application_token_file). State (cursor, outbox, audit "
        "log) lives in store.path, so a restart resumes where the last run stopped.",
    )
    _add_config(run)
    run.add_argument(
        "--dry-run",
        action="store_true",
        help='evaluate and record everything, but call nothing ("would have acted")',
    )
    run.add_argument("--rules", type=Path, metavar="PATH", help="override the config's rules")
    run.set_defaults(handler=_cmd_run)

    demo = commands.add_parser(
        "demo",
        help="run the engine against the built-in simulator with the example rules",
        description="Start an emnify-compatible simulator on loopback, run the engine against "
        "it with the rules in rules/, and print what happened: events polled, rules matched, "
        "actions taken, and the SIMs whose status changed. Needs no account and no network.",
    )
    demo.add_argument(
        "--duration",
        type=_duration,
        default=timedelta(seconds=20),
        metavar="TIME",
        help="how long to run, e.g. 20s or 2m; 0 runs until Ctrl-C (default: 20s)",
    )
    demo.add_argument(
        "--rules",
        type=Path,
        default=Path("rules"),
        metavar="PATH",
        help="rule file or folder (default: rules/)",
    )
    demo.add_argument(
        "--rate",
        type=float,
        default=8.0,
        metavar="N",
        help="simulated events per second (default: 8)",
    )
    demo.add_argument("--seed", type=int, default=7, help="simulator seed (default: 7)")
    demo.set_defaults(handler=_cmd_demo)

    simulate = commands.add_parser(
        "simulate",
        help="run the emnify API simulator on its own",
        description="Serve an emnify-compatible API on loopback: authentication, events with "
        "paging, SIM and endpoint status, SMS, plus an admin API (/admin/...) to inject events, "
        "read state and switch on fault injection. Point `api.base_url` at it.",
    )
    simulate.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    simulate.add_argument("--port", type=int, default=8089, help="port (default: 8089)")
    simulate.add_argument(
        "--rate",
        type=float,
        default=1.0,
        metavar="N",
        help="generated events per second, 0 for none (default: 1)",
    )
    simulate.add_argument("--seed", type=int, default=1, help="random seed (default: 1)")
    simulate.add_argument(
        "--endpoints",
        type=int,
        default=20,
        metavar="N",
        help="size of the simulated fleet (default: 20)",
    )
    simulate.add_argument(
        "--organisations",
        metavar="NAMES",
        help="serve several organisations, comma-separated (e.g. acme,globex): each with its"
        " own fleet and events and the application token NAME-application-token",
    )
    simulate.add_argument(
        "--write-events",
        type=Path,
        metavar="FILE",
        help="instead of serving, write --count generated events to FILE as JSON lines",
    )
    simulate.add_argument(
        "--count",
        type=int,
        default=10000,
        metavar="N",
        help="events to write with --write-events (default: 10000)",
    )
    simulate.set_defaults(handler=_cmd_simulate)

    validate = commands.add_parser(
        "validate",
        help="check rule files and exit 0 (valid) or 1 (with every problem, as file:line)",
        description="Load and check a rule file or a folder of *.yaml/*.yml rule files: "
        "unknown keys, wrong types, unknown actions and event types, duplicate ids and keys, "
        "invalid JsonLogic. Prints each problem as file:line with a hint. Warnings (a rule "
        "that loads but likely does not do what was meant, e.g. `in` over the comma-separated "
        "`endpoint.tags`, or an event-type id the catalog does not know) are printed too and "
        "do not fail validation.",
    )
    validate.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=None,
        metavar="PATH",
        help="rule file or folder (default: the config's `rules`, else rules/)",
    )
    validate.add_argument(
        "--config",
        type=Path,
        help="the config file: `organisation:` in rules must name one of its `organisations:`,"
        " whose own rule folders are checked too",
    )
    validate.set_defaults(handler=_cmd_validate)

    replay = commands.add_parser(
        "replay",
        help="evaluate a file of events against rules and print the planned actions",
        description="Read raw emnify events (JSON lines or a JSON array), evaluate them in file "
        "order with the clock taken from their timestamps, drop repeated ids as `run` does, "
        "call nothing, and print one JSON object per planned action on stdout: "
        '{"event_id", "rule", "action", "target", "params"} (follow-ups add "due"). Threshold '
        "windows, throttles, blast-radius guards and shadow mode apply as in `run`, on the "
        'events\' clock; a follow-up cancelled by a later event prints {"action": "cancel", '
        '"cancels": KEY}. Absence rules judge silences up to the newest event read (or '
        '--until) and print with "at", the moment the silence reached its span. Malformed '
        "lines are reported on stderr with their line number and skipped.",
    )
    replay.add_argument(
        "--rules", type=Path, required=True, metavar="PATH", help="rule file or folder"
    )
    replay.add_argument(
        "--events",
        type=Path,
        required=True,
        metavar="FILE",
        help="events file: JSON lines or a JSON array",
    )
    replay.add_argument(
        "--until",
        type=_moment,
        metavar="TIME",
        help="after the events, advance the clock to TIME (ISO 8601): absence rules fire for "
        "silences up to it (default: the newest event's time)",
    )
    replay.add_argument(
        "--single-process",
        action="store_true",
        help="read and match the events in this process too (by default a second process "
        "reads, parses and matches ahead when the machine has two cores and the file is "
        "larger than 4 MB; the output is the same)",
    )
    replay.add_argument(
        "--lookups",
        type=Path,
        metavar="FILE",
        help="facts for rules with `lookup:`, keyed by endpoint id (a lookup file: see the "
        "README's Lookups section); without it every lookup is unavailable",
    )
    _add_config(replay)
    replay.set_defaults(handler=_cmd_replay)

    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except RuleSetError as error:
        for problem in error.errors:
            print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    except EngineError as error:
        from engine.secrets import redact

        print(f"error: {redact(str(error))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read stdout stopped (`| head`): end quietly with the status a C tool would
        # get from SIGPIPE, and keep the interpreter's final flush from complaining again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


def _load_rules(path: Path) -> Any:
    from engine.cron import check_crontab
    from engine.rules import load_rules

    return load_rules(path, cron=check_crontab)


def _cmd_validate(args: argparse.Namespace) -> int:
    path: Path = args.path or Path("rules")
    if args.config is None:
        rules = _load_rules(path)
    else:
        from engine.config import load_config
        from engine.cron import check_crontab
        from engine.rules import load_rules

        config = load_config(args.config)
        path = args.path or config.rules
        rules = load_rules(path, cron=check_crontab, organisations=config.rule_scopes)
    for warning in rules.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    enabled = sum(1 for r in rules.rules if r.enabled)
    warned = f", {len(rules.warnings)} warning(s)" if rules.warnings else ""
    print(f"{path}: {len(rules.rules)} rules valid ({enabled} enabled){warned}")
    return EXIT_OK


def _moment(text: str) -> datetime:
    from engine.errors import EventFormatError
    from engine.events import parse_timestamp

    try:
        return parse_timestamp(text)
    except EventFormatError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time like 2025-05-01T18:00:00Z"
        ) from None


def _cmd_replay(args: argparse.Namespace) -> int:
    from engine import logging as engine_logging
    from engine.echoes import DEFAULT_ECHOES, DEFAULT_LOOP_BREAKER, LoopBreaker
    from engine.lookup_fixture import load_lookup_fixture
    from engine.progress import Progress
    from engine.sources.replay import replay

    # stdout carries the planned actions only; problems are reported with line numbers below.
    engine_logging.configure("error", "auto")
    rules = _load_rules(args.rules)
    out = sys.stdout.buffer

    def planned(item: Any) -> None:
        out.write(orjson.dumps(item.as_json()) + b"\n")

    def problem(line: int, reason: str) -> None:
        print(f"{args.events}:{line}: {reason}", file=sys.stderr)

    progress = Progress("replaying", stream=sys.stderr)
    if progress.enabled:
        progress.total = _count_lines(args.events)
    dry_run, max_actions = False, None
    echoes = DEFAULT_ECHOES
    loop_breaker: LoopBreaker | None = DEFAULT_LOOP_BREAKER
    mute_windows: tuple[Any, ...] = ()
    if args.config is not None:  # the guards, dry_run, mute windows as `run` has them
        from engine.config import load_config

        config = load_config(args.config)
        dry_run, max_actions = config.dry_run, config.guard_max_actions
        echoes, loop_breaker = config.echoes, config.loop_breaker
        mute_windows = config.mute_windows
    started = time.perf_counter()
    stats = replay(
        args.events,
        rules,
        on_planned=planned,
        on_problem=problem,
        on_progress=progress.update,
        dry_run=dry_run,
        max_actions=max_actions,
        parallel=False if args.single_process else None,
        echoes=echoes,
        loop_breaker=loop_breaker,
        until=args.until,
        mute_windows=mute_windows,
        lookups=load_lookup_fixture(args.lookups) if args.lookups is not None else None,
    )
    out.flush()
    seconds = time.perf_counter() - started
    progress.done(stats.records)
    print(
        f"replayed {stats.records} records in {seconds:.1f} s "
        f"({stats.records / max(seconds, 1e-9):,.0f}/s): {stats.duplicates} duplicates dropped, "
        f"{stats.bad_lines + stats.rejected} skipped, {stats.matches} matches, "
        f"{stats.planned} planned actions"
        + (f", {stats.cancelled} follow-ups cancelled" if stats.cancelled else ""),
        file=sys.stderr,
    )
    print(_per_rule(rules, stats), file=sys.stderr)
    return EXIT_OK


def _per_rule(rules: Any, stats: Any) -> str:
    """The replay's matches and planned actions per rule, in rule-file order; a digest rule
    plans nothing during a replay (it acts at its schedule), so its matches show only here."""
    from engine.commands.tables import table

    rows: list[tuple[object, ...]] = []
    quiet: list[str] = []
    for rule in rules.rules:
        matched, planned = stats.matches_by_rule[rule.id], stats.planned_by_rule[rule.id]
        if not matched and not planned:
            quiet.append(rule.id)
            continue
        note = "a digest: acts at its schedule, not in a replay" if rule.digest else None
        rows.append((rule.id, matched, planned, note))
    lines = [table(["rule", "matches", "planned", "note"], rows)] if rows else []
    if quiet:
        named = ", ".join(quiet[:10]) + (f" and {len(quiet) - 10} more" if len(quiet) > 10 else "")
        lines.append(f"{len(quiet)} rule(s) matched nothing: {named}")
    return "\n".join(lines)


def _count_lines(path: Path) -> int | None:
    """Lines in a JSON-lines file, for the progress bar's total (None: unknown)."""
    from engine.sources.replay import is_json_array

    if is_json_array(path):
        return None  # a JSON array: read in one piece, no useful total
    try:
        with path.open("rb") as handle:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
    except OSError:
        return None  # `replay` itself reports the unreadable file


def _cmd_run(args: argparse.Namespace) -> int:
    from engine import logging as engine_logging
    from engine.config import load_config
    from engine.daemon import Daemon, hold_reloads_while_starting, install_signal_handlers

    overrides: dict[str, Any] = {}
    if args.dry_run:
        overrides["dry_run"] = True
    config = load_config(args.config, overrides)
    if args.rules:
        from dataclasses import replace

        config = replace(config, rules=args.rules)
    engine_logging.configure(config.log_level, config.log_format)
    # With `organisations:`, each one's token (the first one's stands for the engine where
    # one is needed: the catalog's fetch).
    tokens = {o.name: o.application_token() for o in config.organisations}
    token = next(iter(tokens.values())) if tokens else config.application_token()
    from engine import sources

    # What the listed sources need (the Data Streamer's secret), before anything starts.
    sources.check(config.sources, config.source_settings)
    services: list[Any] = []
    if config.ui.enabled and not config.http.enabled:
        raise EngineError("ui: the console needs the HTTP server, but `http.enabled` is false")
    if config.http.enabled:
        from engine.http.service import HttpService

        pages = None
        if config.ui.enabled:
            from engine.console.app import console_pages

            pages = console_pages(config.ui)  # no login set stops the start here
        http = HttpService(config.http, pages)
        http.bind()  # a port in use fails here, before anything starts
        services.append(http)

    import asyncio

    async def main_loop() -> None:
        from engine.emnify import EmnifyClient
        from engine.startup import load_rules_and_services

        hold_reloads_while_starting()
        # The event-type catalog comes first, so rules may name types only the API knows;
        # invalid rules end the start here (RuleSetError, every problem with file:line). It
        # is fetched with the daemon's own client: one login, not two.
        first_api = config.organisations[0].api if config.organisations else config.api
        client = EmnifyClient(token, first_api)
        try:
            rules, rule_services = await load_rules_and_services(
                config.rules, config.api, token, client=client, organisations=config.rule_scopes
            )
        except BaseException:
            await client.aclose()
            raise
        stop = asyncio.Event()
        install_signal_handlers(stop)
        daemon = Daemon(
            config,
            rules,
            token,
            services=[*services, *rule_services.all()],
            client=client,
            organisation_tokens=tokens,
        )
        await daemon.run(stop)

    asyncio.run(main_loop())
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from engine.demo import run_demo

    return run_demo(rules_path=args.rules, duration=args.duration, rate=args.rate, seed=args.seed)


def _cmd_simulate(args: argparse.Namespace) -> int:
    import asyncio

    from engine.simulator import SimulatorConfig, serve

    if args.write_events:
        return _write_events(args.write_events, args.count, args.seed, args.endpoints)
    config = SimulatorConfig(seed=args.seed, endpoints=args.endpoints, event_rate=args.rate)
    names = [n.strip() for n in (args.organisations or "").split(",") if n.strip()]

    def ready(banner: str) -> None:
        print(banner, flush=True)
        print("admin API: GET /admin/sims, POST /admin/events, PUT /admin/faults", flush=True)

    try:
        asyncio.run(serve(config, args.host, args.port, on_ready=ready, organisations=names))
    except OSError as error:
        raise EngineError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None
    return EXIT_OK


def _write_events(path: Path, count: int, seed: int, endpoints: int) -> int:
    from engine.progress import Progress
    from engine.simulator import generate_events

    progress = Progress("writing events", total=count)
    try:
        with path.open("wb") as out:
            for number, record in enumerate(
                generate_events(count, seed=seed, endpoints=endpoints), start=1
            ):
                out.write(orjson.dumps(record) + b"\n")
                if number % 10000 == 0:
                    progress.update(number)
    except OSError as error:
        raise EngineError(f"cannot write {path}: {error.strerror}") from None
    progress.done(count)
    print(f"wrote {count} events to {path}", file=sys.stderr)
    return EXIT_OK
