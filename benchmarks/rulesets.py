"""The rule sets the benchmarks run: 50 rules an operator of an IoT fleet might write, and
1,000 (those 50 plus 950 rules pinned to single devices, the usual way to get that many).

The YAML files under `benchmarks/rules/` are generated from this module and committed, so
anyone can `event-engine validate` or `event-engine replay` them by hand.
`python -m benchmarks.rulesets` writes them again; `python -m benchmarks.rulesets --check`
fails when the committed files differ from what this module generates.

Device-pinned rules name devices of the fleet `event-engine simulate --write-events
--endpoints 1000 --seed 1` writes events for (see FLEET_SIZE, FLEET_SEED).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from engine.simulator import build_fleet

RULES_DIR = Path(__file__).parent / "rules"
FLEET_SIZE = 1000
FLEET_SEED = 1
HOOK = "https://hooks.example.com/emnify"

Rule = dict[str, Any]


def _webhook(channel: str, **body: str) -> dict[str, Any]:
    return {"webhook": {"url": f"{HOOK}/{channel}", "body": body}}


def _log(message: str, level: str = "info") -> dict[str, Any]:
    return {"log": {"message": message, "level": level}}


_SIM_TEXT = "SIM {{ event.sim.iccid }} ({{ event.endpoint.name }}): {{ event.description }}"
_EVENT_TEXT = "{{ event.event_type.description }}: {{ event.description }}"


def _quota_rules() -> list[Rule]:
    rules: list[Rule] = [
        {
            "id": "suspend-sim-on-quota-used-up",
            "description": "Suspend SIMs whose data quota is used up, restore them after a day",
            "when": {"source": "policy_control", "type": 19},
            "condition": {"!": {"in": ["vip", {"var": "endpoint.tags"}]}},
            "actions": [
                {"suspend_sim": {}},
                _webhook("ops", text=_SIM_TEXT, iccid="{{ event.sim.iccid }}"),
                {"after": "24h", "do": {"activate_sim": {}}},
            ],
        },
        {
            "id": "notify-vip-quota-used-up",
            "when": {"type": 19, "tags": "vip"},
            "actions": [_webhook("vip", text=_SIM_TEXT)],
        },
        {
            "id": "quota-almost-gone",
            "when": {"type": 18},
            "condition": {"<": [{"var": "detail.quota.volume"}, 2]},
            "actions": [_log("quota almost gone: " + _SIM_TEXT, "warning")],
        },
        {
            "id": "quota-used-up-three-times",
            "description": "Disable endpoints that use up their quota again and again",
            "when": {"type": 19, "source": "policy_control"},
            "threshold": {"count": 3, "within": "6h", "per": "sim.iccid"},
            "actions": [{"disable_endpoint": {}}, _webhook("ops", text=_SIM_TEXT)],
        },
        {
            "id": "quota-alert-any",
            "description": "Every quota alert, written as plain JsonLogic",
            "condition": {
                "and": [
                    {"in": [{"var": "event_type.id"}, [18, 19]]},
                    {"==": [{"var": "alert"}, True]},
                ]
            },
            "actions": [_log(_EVENT_TEXT)],
        },
        {
            "id": "trial-suspend-fleet-on-quota",
            "description": "On trial: suspend fleet SIMs on quota used up",
            "mode": "shadow",
            "when": {"type": "Quota used up", "tags": "fleet"},
            "actions": [{"suspend_sim": {}}],
        },
    ]
    for tag in ("fleet", "meter", "berlin", "hamburg", "vip"):
        rules.append(
            {
                "id": f"quota-threshold-{tag}",
                "when": {"type": 18, "source": "policy_control", "tags": tag},
                "condition": {"<=": [{"var": "detail.quota.volume"}, 5]},
                "actions": [_webhook(tag, text=_SIM_TEXT, tag=tag)],
            }
        )
    return rules


def _sms_quota_rules() -> list[Rule]:
    return [
        {
            "id": "sms-quota-used-up",
            "when": {"type": 21},
            "actions": [_webhook("ops", text=_SIM_TEXT)],
        },
        {
            "id": "sms-quota-threshold",
            "when": {"type": 20, "alert": True},
            "condition": {"<": [{"var": "detail.quota.volume"}, 3]},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "sms-quota-used-up-vip",
            "when": {"type": 21, "tags": "vip"},
            "actions": [_webhook("vip", text=_SIM_TEXT)],
        },
        {
            "id": "sms-quota-threshold-repeated",
            "when": {"type": 20},
            "threshold": {"count": 3, "within": "24h", "per": "endpoint.id"},
            "actions": [_webhook("ops", text=_SIM_TEXT)],
        },
    ]


def _blocking_rules() -> list[Rule]:
    return [
        {
            "id": "sms-device-on-endpoint-blocked",
            "when": {"type": "Endpoint blocked", "alert": True},
            "actions": [
                {"send_sms": {"payload": "LIMIT_REACHED {{ event.endpoint.name }}"}},
                _log("endpoint {{ event.endpoint.name }} blocked: SMS sent", "warning"),
            ],
        },
        {
            "id": "endpoint-blocked-fleet",
            "when": {"type": 11, "tags": "fleet"},
            "actions": [_webhook("fleet", text=_SIM_TEXT)],
        },
        {
            "id": "endpoint-blocked-twice",
            "when": {"type": 11},
            "threshold": {"count": 2, "within": "1d", "per": "endpoint.id"},
            "actions": [{"disable_endpoint": {}}],
        },
        {
            "id": "endpoint-blocked-meter",
            "when": {"type": 11},
            "condition": {"in": ["meter", {"var": "endpoint.name"}]},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "organisation-blocked",
            "when": {"type": 12, "severity": "critical"},
            "actions": [_webhook("oncall", summary=_EVENT_TEXT)],
        },
        {
            "id": "critical-policy-control-to-oncall",
            "when": {"severity": "critical", "source": "policy_control"},
            "actions": [
                _webhook("oncall", summary=_EVENT_TEXT, org="{{ event.organisation.name }}")
            ],
        },
        {
            "id": "log-every-critical",
            "when": {"severity": "critical"},
            "actions": [_log(_EVENT_TEXT, "error")],
        },
    ]


def _session_rules() -> list[Rule]:
    return [
        {
            "id": "pdp-rejected-no-quota",
            "when": {"type": 3, "source": "policy_control"},
            "condition": {"in": ["no quota", {"var": "description"}]},
            "actions": [_webhook("ops", text=_SIM_TEXT)],
        },
        {
            "id": "pdp-rejected-service-disabled",
            "when": {"type": 3, "source": "policy_control"},
            "condition": {"in": ["data service disabled", {"var": "description"}]},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "pdp-rejected-burst",
            "when": {"type": 3, "source": "policy_control", "alert": True},
            "threshold": {"count": 5, "within": "10m", "per": "sim.iccid"},
            "actions": [{"suspend_sim": {}}],
        },
        {
            "id": "meter-on-2g-3g",
            "when": {"type": 3, "source": "network", "tags": "meter"},
            "condition": {"in": [{"var": "detail.pdp_context.rat_type"}, [1, 2]]},
            "actions": [_log("{{ event.endpoint.name }} on a legacy radio")],
        },
        {
            "id": "fleet-session-on-swisscom",
            "when": {"type": 3, "source": "network", "tags": "fleet"},
            "condition": {"==": [{"var": "detail.name"}, "Swisscom"]},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "large-data-session",
            "when": {"type": 5},
            "condition": {">": [{"var": "detail.volume.total"}, 20]},
            "actions": [_webhook("usage", text=_SIM_TEXT, mb="{{ event.detail.volume.total }}")],
        },
        {
            "id": "large-meter-session",
            "when": {"type": "Delete PDP Context", "tags": "meter"},
            "condition": {">": [{"var": "detail.volume.total"}, 5]},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "vip-session-abroad",
            "when": {"type": 5, "tags": "vip"},
            "condition": {"!=": [{"var": "detail.country.iso_code"}, "de"]},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "empty-data-session",
            "when": {"type": 5},
            "condition": {"==": [{"var": "detail.volume.total"}, 0]},
            "actions": [_log(_SIM_TEXT, "debug")],
        },
        {
            "id": "disconnect-for-throttling",
            "when": {"type": 0, "source": "policy_control"},
            "condition": {"in": ["throttling", {"var": "description"}]},
            "actions": [_log(_SIM_TEXT)],
        },
    ]


def _location_rules() -> list[Rule]:
    rules: list[Rule] = []
    for country in ("fr", "nl", "ch"):
        for tag in ("fleet", "vip"):
            rules.append(
                {
                    "id": f"{tag}-roaming-{country}",
                    "when": {"type": [1, 2], "source": "network", "tags": tag},
                    "condition": {"==": [{"var": "detail.country.iso_code"}, country]},
                    "actions": [_log(f"{tag} device in {country}: " + _SIM_TEXT)],
                }
            )
    rules += [
        {
            "id": "vip-outside-germany",
            "when": {"type": ["Update location", 2], "tags": "vip"},
            "condition": {
                "and": [
                    {"!=": [{"var": "detail.country.iso_code"}, "de"]},
                    {"!=": [{"var": "detail.country.iso_code"}, None]},
                ]
            },
            "actions": [_webhook("vip", text=_SIM_TEXT, country="{{ event.detail.country.name }}")],
        },
        {
            "id": "device-keeps-dropping-off",
            "description": "A device purged from the network three times within an hour",
            "when": {"type": [15, 16]},
            "threshold": {"count": 3, "within": "1h", "per": "sim.iccid"},
            "actions": [_webhook("ops", text=_SIM_TEXT)],
        },
        {
            "id": "vip-offline",
            "when": {"type": 15, "tags": "vip"},
            "actions": [_webhook("vip", text=_SIM_TEXT)],
        },
        {
            "id": "vip-gprs-purged",
            "when": {"type": 16, "tags": "vip"},
            "actions": [_log(_SIM_TEXT)],
        },
    ]
    return rules


def _api_rules() -> list[Rule]:
    # Events of API actions: rare in a network event stream, common in every rule file.
    return [
        {
            "id": "crm-on-sim-activation",
            "when": {"source": "api", "type": "SIM activation"},
            "actions": [_webhook("crm", iccid="{{ event.sim.iccid }}", at="{{ event.timestamp }}")],
        },
        {
            "id": "audit-sim-suspension",
            "when": {"source": "api", "type": 9},
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "application-token-failed",
            "when": {"type": 7},
            "actions": [_webhook("security", text=_EVENT_TEXT)],
        },
        {
            "id": "user-login-failed",
            "when": {"type": 6, "severity": "warn"},
            "actions": [_webhook("security", text=_EVENT_TEXT)],
        },
        {
            "id": "audit-endpoint-disabled",
            "when": {"type": 43},
            "actions": [_log(_EVENT_TEXT)],
        },
    ]


def _plain_jsonlogic_rules() -> list[Rule]:
    # Rules written as JsonLogic alone, with no shorthand for the index to sort them by:
    # every event meets them.
    return [
        {
            "id": "any-alert-for-vip",
            "condition": {
                "and": [
                    {"==": [{"var": "alert"}, True]},
                    {"in": ["vip", {"var": "endpoint.tags"}]},
                ]
            },
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "hamburg-warnings",
            "condition": {
                "and": [
                    {"==": [{"var": "event_severity.id"}, 1]},
                    {"in": ["hamburg", {"var": "endpoint.tags"}]},
                ]
            },
            "actions": [_log(_SIM_TEXT)],
        },
        {
            "id": "sms-traffic-alerts",
            "condition": {"==": [{"var": "detail.traffic_type.description"}, "SMS"]},
            "actions": [_log(_SIM_TEXT)],
        },
    ]


def fleet_rules() -> list[Rule]:
    """The 50 rules."""
    rules = (
        _quota_rules()
        + _sms_quota_rules()
        + _blocking_rules()
        + _session_rules()
        + _location_rules()
        + _api_rules()
        + _plain_jsonlogic_rules()
    )
    return rules


def device_rules(count: int) -> list[Rule]:
    """`count` rules each pinned to one device of the benchmark fleet, by name or ICCID."""
    fleet = build_fleet(FLEET_SIZE, FLEET_SEED)
    endpoints = list(fleet.endpoints.values())
    rules: list[Rule] = []
    for number in range(count):
        endpoint = endpoints[number % len(endpoints)]
        iccid = fleet.sim_of(endpoint).iccid
        kind = number % 4
        if kind == 0:
            rules.append(
                {
                    "id": f"device-{endpoint.name}-quota",
                    "when": {"endpoint_name": endpoint.name, "type": [18, 19]},
                    "condition": {"<=": [{"var": "detail.quota.volume"}, 1 + number % 10]},
                    "actions": [_webhook(f"customer-{number % 37}", text=_SIM_TEXT)],
                }
            )
        elif kind == 1:
            rules.append(
                {
                    "id": f"device-{endpoint.name}-blocked",
                    "when": {"iccid": iccid, "type": 11},
                    "actions": [
                        {"send_sms": {"payload": "LIMIT_REACHED {{ event.endpoint.name }}"}}
                    ],
                }
            )
        elif kind == 2:
            rules.append(
                {
                    "id": f"device-{endpoint.name}-abroad",
                    "when": {"endpoint_name": endpoint.name, "type": [1, 2]},
                    "condition": {"!=": [{"var": "detail.country.iso_code"}, "de"]},
                    "actions": [_log("{{ event.endpoint.name }} abroad: {{ event.detail.name }}")],
                }
            )
        else:
            rules.append(
                {
                    "id": f"device-{endpoint.name}-large-session",
                    "when": {"iccid": iccid, "type": 5},
                    "condition": {">": [{"var": "detail.volume.total"}, 10 + number % 20]},
                    "actions": [_webhook(f"customer-{number % 37}", text=_SIM_TEXT)],
                }
            )
    return rules


def _document(rules: list[Rule], header: str) -> str:
    body = yaml.safe_dump({"rules": rules}, sort_keys=False, width=100, allow_unicode=True)
    return header + body


def rule_files() -> dict[str, str]:
    """File name → content of every generated rule file."""
    base = fleet_rules()
    note = "# Generated by `python -m benchmarks.rulesets`; do not edit by hand.\n"
    return {
        "fleet-50.yaml": _document(
            base, note + f"# {len(base)} rules an operator of an IoT fleet might write.\n"
        ),
        "fleet-1000.yaml": _document(
            base + device_rules(1000 - len(base)),
            note + "# The 50 fleet rules plus 950 rules pinned to single devices.\n",
        ),
    }


def write(directory: Path = RULES_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in rule_files().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def stale(directory: Path = RULES_DIR) -> list[str]:
    """Names of committed rule files that differ from what this module generates."""
    out = []
    for name, text in rule_files().items():
        path = directory / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the files are stale")
    args = parser.parse_args(argv)
    if args.check:
        names = stale()
        for name in names:
            print(
                f"{RULES_DIR / name} is stale: run python -m benchmarks.rulesets", file=sys.stderr
            )
        return 1 if names else 0
    for path in write():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
