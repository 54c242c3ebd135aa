"""Operator rules: loading and validating YAML, and matching events against them.

`load_rules(path)` returns a `RuleSet` or raises `RuleSetError` with every problem found,
each at `file:line`. `RuleSet.match(event)` gives the matching rules in rule-file order;
`RuleSet.explain(event, rule)` says why a rule did not match.
"""

from engine.durations import parse_duration
from engine.rules.catalog import EventTypeCatalog
from engine.rules.condition import Condition, ConditionError, compile_condition
from engine.rules.loader import load_rules, load_rules_text
from engine.rules.model import ActionStep, CancelIf, MaxActions, Mode, Rule, Threshold, Throttle
from engine.rules.ruleset import RuleSet
from engine.rules.when import When

__all__ = [
    "ActionStep",
    "CancelIf",
    "Condition",
    "ConditionError",
    "EventTypeCatalog",
    "MaxActions",
    "Mode",
    "Rule",
    "RuleSet",
    "Threshold",
    "Throttle",
    "When",
    "compile_condition",
    "load_rules",
    "load_rules_text",
    "parse_duration",
]
