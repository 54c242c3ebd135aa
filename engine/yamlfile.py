"""The one YAML loader of the engine: rule files, rule-test files and the config file.

Plain PyYAML keeps the last of two equal keys without a word, and forgets where anything
was. Every file the engine reads needs both: a duplicate `when:` silently drops half a rule,
and every validation error must name `file:line`. Mappings and lists come back as
`YamlMapping` and `YamlList` (a `dict` and a `list` that also carry their lines, read by
`engine.section.Section`); `plain` strips them again before data leaves the loader.

Rule and rule-test files get only JSON-shaped values (`json_values=True`): timestamps stay
strings, and tags such as `!!binary`, `!!set` or `!!timestamp` are errors, so conditions and
action parameters never meet a type that JSON cannot carry. The config file keeps YAML's own
types, as it always has: an unquoted date is a date, which no option takes, so it is refused
where it is read rather than read as text.

A file's cost to load is bounded by its size, whatever it holds. A few hundred bytes of
anchors and aliases can stand for gigabytes ("billion laughs"): the loader shares one built
object per anchor, but whatever later copies the data (`plain`, the condition compiler, a
reload's comparison, JSON output) would pay in full. So before anything is built, the node
graph is measured: the copies aliases stand for may add at most `MAX_ALIAS_EXPANSION`
(characters of scalars plus one per node), nesting stops at `MAX_DEPTH` levels (every walk
over the data is recursive), and a number has at most `MAX_NUMBER_CHARS` characters (a
sexagesimal `1:0:0:...` costs quadratic time to convert). `read_yaml_file` caps the file at
`MAX_FILE_BYTES` before reading it.
"""

from __future__ import annotations

from pathlib import Path
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
_NUMBERS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")

MAX_FILE_BYTES = 512 << 10
MAX_DEPTH = 64
MAX_ALIAS_EXPANSION = 1_000_000
MAX_NUMBER_CHARS = 100
# Problems reported for one file: past this many, more of them would only bury the first.
MAX_REPORTED = 100


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
    nodes is faster than PyYAML's generic constructor, and it is where lines and duplicate
    keys are recorded. Scalars get YAML's safe types (what the config file reads)."""

    def __init__(self, stream: str, file: str) -> None:
        super().__init__(stream)
        self.file = file
        self.duplicates: list[ConfigError] = []
        self._built: dict[Node, Any] = {}  # anchored nodes are shared: build each once

    def load(self) -> Any:
        node = self.get_single_node()
        if node is None:
            return None
        check_cost(node, self.file)
        return self._build(node)

    def _build(self, node: Node) -> Any:
        if isinstance(node, ScalarNode):
            if node.tag == _STR:
                return node.value
            # Numbers, booleans, null, and errors for tags we refuse.
            return self._construct(node)
        built = self._built.get(node)
        if built is not None:
            return built
        if isinstance(node, MappingNode) and node.tag == _MAP:
            built = self._mapping(node)
        elif isinstance(node, SequenceNode) and node.tag == _SEQ:
            built = YamlList(_line(node))
            for child in node.value:
                built.append(self._build(child))
                built.item_lines.append(_line(child))
        else:
            built = self._construct(node)
        self._built[node] = built
        return built

    def _construct(self, node: Node) -> Any:
        try:
            return self.construct_object(node, deep=True)
        except (ValueError, OverflowError, TypeError) as error:
            # An explicit tag on text that is not of its type, e.g. `!!int abc`.
            tag = node.tag.removeprefix("tag:yaml.org,2002:")
            problem = f"not a valid {tag}: {error}"
            raise ConstructorError(None, None, problem, node.start_mark) from None

    def _mapping(self, node: MappingNode) -> YamlMapping:
        mapping = YamlMapping(_line(node))
        first_seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self._key(node, key_node)
            if key in first_seen:
                if len(self.duplicates) >= MAX_REPORTED:
                    continue
                self.duplicates.append(
                    ConfigError(
                        f"duplicate key `{shown_key(key)}` (first at line {first_seen[key]})",
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


class _JsonLoader(_Loader):
    """`_Loader` building only what JSON can carry (rule and rule-test files)."""


for _tag in _NOT_JSON:
    _JsonLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _JsonLoader.construct_undefined)
# Unquoted dates stay text: a condition compares them as strings, as JSON would.
_JsonLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _TIMESTAMP]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml_file(path: Path, hint: str | None = None) -> str:
    """The text of a YAML file, read no further than `MAX_FILE_BYTES`: ConfigError when it
    is larger (`hint` says what to do instead), unreadable or not UTF-8."""
    name = str(path)
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ConfigError(f"cannot read: {error.strerror or error}", Location(name)) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(
            f"larger than {MAX_FILE_BYTES >> 10} KiB, too large to load", Location(name), hint
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"not UTF-8 text ({error.reason})", Location(name)) from None


def check_cost(root: Node, file: str) -> None:
    """Raise ConfigError when building the data of `root` would cost out of proportion to
    its text: nesting deeper than `MAX_DEPTH`, an alias inside its own anchor, copies by
    alias adding more than `MAX_ALIAS_EXPANSION`, or a number longer than
    `MAX_NUMBER_CHARS`. One pass over the nodes, each visited once however often aliases
    name it, without recursion (the document may be a thousand levels deep)."""
    # Per collection: its size as if every alias below were a copy (capped), and its height.
    measured: dict[Node, tuple[int, int]] = {}
    open_nodes: set[Node] = set()  # on the path being walked: meeting one again is a cycle
    named: set[Node] = set()  # a node named a second time, by an alias, is a copy
    copied = 0
    if isinstance(root, ScalarNode):
        _check_scalar(root, file)
        return
    stack: list[tuple[Node, list[Node] | None]] = [(root, None)]
    while stack:
        node, children = stack.pop()
        if children is None:  # first met: walk its collections first
            if node in measured:
                continue
            if node in open_nodes:
                raise ConfigError("an alias refers to itself", Location(file, _line(node)))
            open_nodes.add(node)
            children = _children(node)
            stack.append((node, children))
            stack.extend((child, None) for child in children if type(child) is not ScalarNode)
            continue
        open_nodes.discard(node)
        total, deepest = 1, 0
        for child in children:
            if type(child) is ScalarNode:
                if child.tag in _NUMBERS:
                    _check_scalar(child, file)
                child_size, child_height = 1 + len(child.value), 1
            else:
                child_size, child_height = measured[child]
            if child in named:
                copied += child_size
                if copied > MAX_ALIAS_EXPANSION:
                    raise ConfigError(
                        f"aliases copy too much: with the alias of the anchor at line "
                        f"{_line(child)}, their copies pass {MAX_ALIAS_EXPANSION:,} characters",
                        Location(file, _line(node)),
                        "an alias may repeat a shared block, but aliases of aliases multiply "
                        "it; write the data out instead",
                    )
            else:
                named.add(child)
            total += child_size
            deepest = max(deepest, child_height)
        if deepest >= MAX_DEPTH:
            raise ConfigError(
                f"nested more than {MAX_DEPTH} levels deep",
                Location(file, _line(node)),
                "flatten the structure",
            )
        measured[node] = (min(total, MAX_ALIAS_EXPANSION + 1), deepest + 1)


def _children(node: Node) -> list[Node]:
    if isinstance(node, MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, SequenceNode):
        return list(node.value)
    return []


def _check_scalar(node: ScalarNode, file: str) -> None:
    if node.tag in _NUMBERS and len(node.value) > MAX_NUMBER_CHARS:
        raise ConfigError(
            f"a number of {len(node.value):,} characters",
            Location(file, _line(node)),
            "quote it if it is meant as text",
        )


def load_yaml(text: str, file: str, *, json_values: bool = True) -> tuple[Any, list[ConfigError]]:
    """Parse one YAML document. Returns the data and the duplicate keys found in it;
    raises ConfigError (with the line YAML reports) when the text is not valid YAML or
    would cost too much to build. `json_values`: only values JSON can carry (rule and
    rule-test files); else YAML's safe types (the config file)."""
    loader = (_JsonLoader if json_values else _Loader)(text, file)
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
    except yaml.reader.ReaderError as error:  # a character YAML does not allow
        line = text.count("\n", 0, error.position) + 1
        raise ConfigError(f"invalid YAML: {_one_line(error)}", Location(file, line)) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML: {_one_line(error)}", Location(file)) from None
    except RecursionError:
        # PyYAML's pure-Python parser (without libyaml) recurses per level while composing,
        # before `check_cost` sees the nodes.
        raise ConfigError(f"nested more than {MAX_DEPTH} levels deep", Location(file)) from None
    finally:
        loader.dispose()
    return data, loader.duplicates


def shown_key(key: object) -> str:
    """A key as an error message quotes it: a long one cut short (it may be half a file)."""
    text = str(key)
    return text if len(text) <= 60 else text[:60] + "..."


def _one_line(error: yaml.YAMLError) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


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
