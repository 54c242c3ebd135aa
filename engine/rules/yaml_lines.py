"""A YAML loader that remembers line numbers and refuses duplicate keys.

Plain PyYAML keeps the last of two equal keys without a word, and forgets where anything
was. Rule files need both: a duplicate `when:` silently drops half a rule, and every
validation error must name `file:line`. Mappings and lists come back as `YamlMapping` and
`YamlList` (a `dict` and a `list` that also carry their lines); `plain` strips them again
before data leaves the loader.

Only JSON-shaped values are built: timestamps stay strings, and tags such as `!!binary`,
`!!set` or `!!timestamp` are errors, so conditions and action parameters never meet a type
that JSON cannot carry.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from engine.errors import ConfigError, Location

_STR = "tag:yaml.org,2002:str"
_MAP = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_MERGE = "tag:yaml.org,2002:merge"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_NOT_JSON = ("binary", "set", "omap", "pairs", "timestamp")


class YamlMapping(dict[Any, Any]):
    """A YAML mapping: a dict that knows its own line and the line of each key."""

    __slots__ = ("key_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[Any, int] = {}

    def line_of(self, key: object) -> int:
        """The line of `key`, or of the mapping itself when the key is absent."""
        return self.key_lines.get(key, self.line)


class YamlList(list[Any]):
    """A YAML sequence: a list that knows its own line and the line of each item."""

    __slots__ = ("item_lines", "line")

    def __init__(self, line: int) -> None:
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Loader(yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader):  # type: ignore[misc]
    """Composes nodes as PyYAML does, then builds the data itself: a direct walk over the
    nodes is about twice as fast as PyYAML's generic constructor, and it is where lines
    and duplicate keys are recorded."""

    def __init__(self, stream: str, file: str) -> None:
        super().__init__(stream)
        self.file = file
        self.duplicates: list[ConfigError] = []
        self._built: dict[Node, Any] = {}  # anchored nodes are shared: build each once
        self._open: set[Node] = set()  # being built: meeting one again means a cycle

    def load(self) -> Any:
        node = self.get_single_node()
        return None if node is None else self._build(node)

    def _build(self, node: Node) -> Any:
        if isinstance(node, ScalarNode):
            if node.tag == _STR:
                return node.value
            # Numbers, booleans, null, and errors for tags we refuse.
            return self.construct_object(node, deep=True)
        built = self._built.get(node)
        if built is not None:
            return built
        if node in self._open:
            raise ConstructorError(None, None, "an alias refers to itself", node.start_mark)
        self._open.add(node)
        if isinstance(node, MappingNode) and node.tag == _MAP:
            built = self._mapping(node)
        elif isinstance(node, SequenceNode) and node.tag == _SEQ:
            built = YamlList(_line(node))
            for child in node.value:
                built.append(self._build(child))
                built.item_lines.append(_line(child))
        else:
            built = self.construct_object(node, deep=True)
        self._open.discard(node)
        self._built[node] = built
        return built

    def _mapping(self, node: MappingNode) -> YamlMapping:
        mapping = YamlMapping(_line(node))
        first_seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self._key(node, key_node)
            if key in first_seen:
                self.duplicates.append(
                    ConfigError(
                        f"duplicate key `{key}` (first at line {first_seen[key]})",
                        Location(self.file, _line(key_node)),
                        "YAML would keep only the last one; remove or rename one of them",
                    )
                )
            else:
                first_seen[key] = _line(key_node)
        # Merged (`<<: *anchor`) pairs come first, so the mapping's own keys win over them.
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self._key(node, key_node)
            mapping[key] = self._build(value_node)
            mapping.key_lines[key] = _line(key_node)
        return mapping

    def _key(self, node: MappingNode, key_node: Node) -> Any:
        key = self._build(key_node)
        try:
            hash(key)
        except TypeError:
            raise ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                "found an unhashable key",
                key_node.start_mark,
            ) from None
        return key


for _tag in _NOT_JSON:
    _Loader.add_constructor(f"tag:yaml.org,2002:{_tag}", _Loader.construct_undefined)
# Unquoted dates stay text: a condition compares them as strings, as JSON would.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str, file: str) -> tuple[Any, list[ConfigError]]:
    """Parse one YAML document. Returns the data and the duplicate keys found in it;
    raises ConfigError (with the line YAML reports) when the text is not valid YAML."""
    loader = _Loader(text, file)
    try:
        data = loader.load()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = error.problem or error.context or "cannot parse"
        if error.context and error.problem:
            # PyYAML splits some messages as ("expected X", "but found Y").
            joined = error.problem.startswith("but ")
            problem = f"{error.context}, {problem}" if joined else f"{problem} ({error.context})"
        hint = syntax_hint(problem, text, line)
        raise ConfigError(f"invalid YAML: {problem}", Location(file, line), hint) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {error}", Location(file)) from None
    finally:
        loader.dispose()
    return data, loader.duplicates


def plain(value: Any) -> Any:
    """The same data as ordinary dicts and lists, for code outside the loader."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def syntax_hint(problem: str, text: str, line: int | None) -> str | None:
    """What usually causes a YAML syntax error like this one, for the error's hint: PyYAML
    says what it found, not what the writer did wrong."""
    lines = text.splitlines()
    written = lines[line - 1] if line is not None and 0 < line <= len(lines) else ""
    indent = written[: len(written) - len(written.lstrip())]
    if "\t" in indent or "tab" in problem:
        return "indent with spaces: YAML does not allow tabs for indentation"
    if "{{" in written and ("unhashable" in problem or "flow" in problem):
        return 'quote a value that starts with a template: "{{ event.sim.iccid }}"'
    if "mapping values are not allowed" in problem:
        return (
            'a text holding ": " needs quotes, e.g. description: "note: this"; or the line '
            "is indented deeper than the key above it"
        )
    if "expected key" in problem or "expected '-'" in problem or "block end" in problem:
        return (
            "check the indentation of this line against the lines above: the keys of one "
            "mapping line up, and so do the `- ` items of one list"
        )
    if "end of stream" in problem and "quoted" in problem:
        return "a quote opened here or above is not closed"
    return None
