"""Start-up of `run` and `demo`: the rules in force and the services that keep them current.

The event-type catalog is fetched before the rules are loaded, so a rule may name a type
only the API knows. Then three services run beside the poller: the daily catalog refresh,
the rule reloader (SIGHUP and file changes) and the digest scheduler, wired so a reload
re-schedules the digests and a changed catalog reloads the rules.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

from engine.catalog_refresh import CatalogRefresh
from engine.cron import check_crontab
from engine.digest_schedule import Digests
from engine.emnify import ClientSettings, EmnifyClient
from engine.errors import ConfigError
from engine.reload import RuleReloader
from engine.rules import RuleSet, load_rules

_log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RuleServices:
    catalog: CatalogRefresh
    reloader: RuleReloader
    digests: Digests

    def all(self) -> list[CatalogRefresh | RuleReloader | Digests]:
        # The reloader first: it takes SIGHUP over, and a changed catalog asks it to reload.
        return [self.reloader, self.catalog, self.digests]


def check_secrets(rules: RuleSet, env: Mapping[str, str] | None = None) -> None:
    """Refuse to start when a `${NAME}` an action's parameters reference is unset: found
    now, it is a config fix; found at the first matching event, it would be a failed
    action."""
    env = os.environ if env is None else env
    missing: dict[str, list[str]] = {}
    for rule in rules.rules:
        for step in (*rule.actions, *rule.on_guard_trip):
            for name in step.action.secret_names():
                if name not in env and f"{name}_FILE" not in env:
                    missing.setdefault(name, []).append(rule.id)
    if missing:
        lines = [
            f"${{{name}}} (rule {', '.join(sorted(set(ids)))})" for name, ids in missing.items()
        ]
        raise ConfigError(
            "environment variables the rules' actions need are not set: " + "; ".join(lines),
            hint="set each one, or NAME_FILE naming a file that holds it",
        )


async def load_rules_and_services(
    rules_path: Path,
    api: ClientSettings,
    application_token: str,
    *,
    watch: bool = True,
    client: EmnifyClient | None = None,
    organisations: Mapping[str, Path | None] | None = None,
) -> tuple[RuleSet, RuleServices]:
    """Fetch the catalog (falling back to the bundled one), load the rules through it
    (RuleSetError when they are invalid), and build the services. With `client` (the one
    the daemon will use, left open) the catalog is fetched with its login; without, with
    a client of its own. `organisations`: the config's, with their own rule folders
    (`load_rules`)."""
    catalog = CatalogRefresh()
    if client is not None:
        await catalog.refresh(client)
    else:
        async with EmnifyClient(application_token, api) as own:
            await catalog.refresh(own)
    rules = load_rules(
        rules_path, catalog=catalog.catalog, cron=check_crontab, organisations=organisations
    )
    for warning in rules.warnings:
        _log.warning("rule warning", warning=str(warning))
    check_secrets(rules)
    digests = Digests()
    reloader = RuleReloader(
        rules_path,
        catalog=catalog.current,
        watch=watch,
        on_reload=[digests.rules_changed],
        organisations=organisations,
    )
    catalog.on_change(lambda _catalog: reloader.request("the event-type catalog changed"))
    return rules, RuleServices(catalog, reloader, digests)
