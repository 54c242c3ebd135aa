"""The service path works as written: the systemd unit, the install steps in the docs and the
service config agree, and every link in the docs leads somewhere.

The install steps are not run here (they create a user and write /etc): the test reads the
shell block from docs/service.md, plays its file-system steps on a model of the paths
(owners, groups, modes, with a strict umask), and checks that the unit's user can read what
the unit points it at, and nothing secret."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest
import yaml

from engine.simulator import SimulatorServer

from helpers import TOKEN

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "event-engine.service"
SERVICE_DOC = ROOT / "docs" / "service.md"
UMASK = 0o027  # a careful administrator's: what `cp` creates is not world-readable

# -- links ---------------------------------------------------------------------------------

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FILE_URL = re.compile(r"file://(/[^\s\"'>)]+)")
_DOC_PATH = re.compile(r"(?<![\w/.])((?:docs|deploy|rules|benchmarks|scripts)/[\w./-]*\w)")
_DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "config.example.yaml",
    ROOT / "deploy" / "config.yaml",
    ROOT / "deploy" / "event-engine.env.example",
    UNIT,
]


def _anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    anchors = set()
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            title = re.sub(r"[^\w\- ]", "", title.replace("`", ""))
            anchors.add(title.replace(" ", "-"))
    return anchors


def _broken_links(document: Path) -> list[str]:
    text = document.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{document.name}: [..]({target}): no {path}")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{document.name}: [..]({target}): no heading #{anchor}")
    for found in _DOC_PATH.finditer(text):
        if re.match(r":\d", text[found.end() :]):
            continue  # `file:line` in an example of an error message
        if not (ROOT / found.group(1)).exists():
            broken.append(f"{document.name}: mentions {found.group(1)}, which does not exist")
    return broken


@pytest.mark.parametrize("document", _DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_path_in_the_docs_leads_to_a_file_that_exists(document: Path) -> None:
    assert _broken_links(document) == []


def test_the_unit_documentation_url_is_installed_by_the_documented_steps() -> None:
    installed = _install(_documented_steps(SERVICE_DOC))
    (url,) = _unit()["Unit"]["Documentation"]
    (path,) = _FILE_URL.findall(url)
    assert path in installed.paths, f"{path} is not created by the steps in docs/service.md"
    assert (ROOT / installed.paths[path].source).is_file()


# -- the unit ------------------------------------------------------------------------------


def _unit() -> dict[str, dict[str, list[str]]]:
    """The unit file's sections and settings (a setting may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def test_reload_sends_sighup_to_the_engine_which_reloads_its_rules_on_it() -> None:
    service = _unit()["Service"]
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["Type"] == ["exec"]  # $MAINPID is the engine itself, not a wrapper
    assert "SIGHUP" in (ROOT / "engine" / "reload.py").read_text(encoding="utf-8")


# -- the install steps, played on a model of the file system ------------------------------


@dataclass
class Node:
    owner: str
    group: str
    mode: int
    is_dir: bool
    source: str = ""  # the repository file it was copied from


@dataclass
class Installed:
    paths: dict[str, Node]
    users: dict[str, str]  # user → its primary group


def _documented_steps(markdown: Path, heading: str = "## Install") -> list[str]:
    """The commands of the first ```sh block after `heading` (comments dropped)."""
    text = markdown.read_text(encoding="utf-8")
    block = text.split(heading, 1)[1].split("```sh\n", 1)[1].split("\n```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def _install(lines: list[str]) -> Installed:
    state = Installed({}, {})
    for line in lines:
        for command in " ".join(line.split("#")[:1]).split("&&"):
            words = shlex.split(command)
            if words and words[0] == "sudo":
                words = words[1:]
            _step(state, words, line)
    return state


def _options(words: list[str], flags: str) -> tuple[dict[str, str], list[str]]:
    """`-m 0750 -o root x y` → ({"-m": "0750", "-o": "root"}, ["x", "y"]) for flags with values."""
    found, rest, i = {}, [], 0
    while i < len(words):
        if words[i] in flags.split():
            found[words[i]] = words[i + 1]
            i += 2
        else:
            rest.append(words[i])
            i += 1
    return found, rest


def _add_tree(state: Installed, source: Path, target: str) -> None:
    """`cp -r` as root: everything root:root, modes from the umask."""
    state.paths[target] = Node("root", "root", 0o777 & ~UMASK, True, str(source.relative_to(ROOT)))
    for item in sorted(source.rglob("*")):
        path = str(PurePosixPath(target) / item.relative_to(source).as_posix())
        mode = (0o777 if item.is_dir() else 0o666) & ~UMASK
        state.paths[path] = Node("root", "root", mode, item.is_dir(), str(item.relative_to(ROOT)))


def _step(state: Installed, words: list[str], line: str) -> None:
    name, args = words[0], words[1:]
    if name == "useradd":
        options, rest = _options(args, "--home-dir --shell")
        assert "--system" in rest and "--user-group" in rest, line
        state.users[rest[-1]] = rest[-1]
    elif name == "install":
        options, rest = _options(args, "-m -o -g")
        owner, group = options.get("-o", "root"), options.get("-g", "root")
        mode = int(options["-m"], 8)
        if "-d" in rest:
            state.paths[rest[-1]] = Node(owner, group, mode, True)
        else:
            source, target = rest
            state.paths[target] = Node(owner, group, mode, False, source)
    elif name == "cp":
        recursive = args[0] == "-r"
        source, target = args[1:] if recursive else args
        if recursive:
            _add_tree(state, ROOT / source, str(PurePosixPath(target) / Path(source).name))
        else:
            name_in = PurePosixPath(target) / Path(source).name if target.endswith("/") else target
            state.paths[str(name_in)] = Node("root", "root", 0o666 & ~UMASK, False, source)
    elif name == "chgrp":
        assert args[0] == "-R", line
        group, top = args[1:]
        for path, node in state.paths.items():
            if path == top or path.startswith(top + "/"):
                node.group = group
    elif name == "python3" and args[:2] == ["-m", "venv"]:
        state.paths[args[2]] = Node("root", "root", 0o755, True)
    elif name.endswith("/bin/pip") and args[:1] == ["install"]:
        venv = str(PurePosixPath(name).parent.parent)
        state.paths[f"{venv}/bin/event-engine"] = Node("root", "root", 0o755, False)
    else:
        assert name in ("sudoedit", "systemctl", "curl"), f"a step this test does not know: {line}"


def _may(node: Node, user: str, group: str, bit: int) -> bool:
    """Whether `user` (primary group `group`) has permission `bit` (4 r, 2 w, 1 x)."""
    if node.owner == user:
        return bool(node.mode >> 6 & bit)
    if node.group == group:
        return bool(node.mode >> 3 & bit)
    return bool(node.mode & bit)


def _readable(state: Installed, path: str, user: str, group: str) -> bool:
    """The user can reach `path` (x on every folder above it that the steps made) and read it."""
    parts = PurePosixPath(path).parts
    for depth in range(2, len(parts)):
        folder = state.paths.get(str(PurePosixPath(*parts[:depth])))
        if folder is not None and not _may(folder, user, group, 1):
            return False
    node = state.paths[path]
    return _may(node, user, group, 4) and (not node.is_dir or _may(node, user, group, 1))


def test_the_documented_steps_let_the_service_user_read_its_config_and_rules_only() -> None:
    state = _install(_documented_steps(SERVICE_DOC))
    service = _unit()["Service"]
    (user,), (group,) = service["User"], service["Group"]
    assert state.users.get(user) == group  # useradd --user-group made both

    # ExecStart runs the installed engine with the installed config...
    (exec_start,) = service["ExecStart"]
    binary, command, _, config_path = shlex.split(exec_start)
    assert (binary in state.paths, command) == (True, "run")
    assert state.paths[config_path].source == "deploy/config.yaml"
    assert _readable(state, config_path, user, group), "the service user cannot read its config"
    # ...whose rules it can list and read, every file of them.
    config = yaml.safe_load((ROOT / "deploy" / "config.yaml").read_text(encoding="utf-8"))
    rules = config["rules"]
    rule_files = [p for p, node in state.paths.items() if p.startswith(rules + "/")]
    assert rule_files and _readable(state, rules, user, group)
    unreadable = [p for p in rule_files if not _readable(state, p, user, group)]
    assert unreadable == []
    # Other local users read none of it.
    assert not _readable(state, config_path, "someone", "users")
    # The secrets are systemd's to read (as root), not the engine's.
    (env_file,) = service["EnvironmentFile"]
    assert state.paths[env_file].owner == "root"
    assert not _readable(state, env_file, user, group)

    # The state the config points at is the unit's state directory, the working directory.
    (state_dir,) = service["StateDirectory"]
    assert PurePosixPath(config["store"]["path"]).parent == PurePosixPath("/var/lib", state_dir)
    assert service["WorkingDirectory"] == [f"/var/lib/{state_dir}"]


def test_the_readme_shows_the_same_install_steps_as_the_service_doc() -> None:
    readme = _documented_steps(ROOT / "README.md", heading="### systemd")
    assert readme == _documented_steps(SERVICE_DOC)


def test_a_directory_made_root_only_is_found_out() -> None:
    # The steps as the README once had them: the engine could not read its config.
    steps = [
        line.replace("install -d -m 0750 -o root -g event-engine", "install -d -m 0750")
        for line in _documented_steps(SERVICE_DOC)
    ]
    state = _install(steps)
    assert not _readable(state, "/etc/event-engine/config.yaml", "event-engine", "event-engine")


# -- the service config, run ---------------------------------------------------------------


def test_the_service_config_runs_without_a_stream_secret_while_the_stream_is_off(
    tmp_path: Path, simulator: SimulatorServer
) -> None:
    text = (ROOT / "deploy" / "config.yaml").read_text(encoding="utf-8")
    text = text.replace("https://cdn.emnify.net", simulator.base_url)
    text = text.replace("/etc/event-engine/rules", str(ROOT / "rules"))
    text = text.replace("/var/lib/event-engine", str(tmp_path))
    text = text.replace("port: 8080", "port: 0")
    assert "${STREAMER_SECRET}" in text  # named, for the day the stream is switched on
    config = tmp_path / "config.yaml"
    config.write_text(text, encoding="utf-8")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("STREAMER_SECRET", "EMNIFY_APPLICATION_TOKEN"))
    }
    env.update(
        {
            "EMNIFY_APPLICATION_TOKEN": TOKEN,
            **{
                f"{name}_WEBHOOK_URL": "http://127.0.0.1:9/hook"
                for name in ("OPS", "ONCALL", "CRM")
            },
            "ONCALL_WEBHOOK_TOKEN": "t",
        }
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "--config", str(config)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and process.poll() is None:
            lines.append(process.stderr.readline())
            if '"engine started"' in lines[-1]:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=15)
    output = "".join(lines) + rest
    assert '"engine started"' in output, output
    assert "STREAMER_SECRET" not in output
    assert process.returncode == 0, output


def test_a_reload_while_the_engine_starts_does_not_end_it(tmp_path: Path) -> None:
    # `systemctl reload` right after `start`, while the catalog's fetch still waits for an
    # API that does not answer: SIGHUP's default action would end the process.
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - id: r\n    actions: [{log: {}}]\n", encoding="utf-8")
    config = tmp_path / "config.yaml"
    config.write_text(
        "api:\n  base_url: http://127.0.0.1:9\n  max_retries: 4\n  backoff_initial: 0.5\n"
        f"rules: {rules}\nstore:\n  path: {tmp_path / 'engine.sqlite3'}\n"
        "http:\n  enabled: false\nlog:\n  format: json\n",
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "run", "--config", str(config)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "EMNIFY_APPLICATION_TOKEN": TOKEN},
    )
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and process.poll() is None:
            lines.append(process.stderr.readline())
            if '"emnify request failed; retrying"' in lines[-1] and len(lines) == 1:
                process.send_signal(signal.SIGHUP)  # the catalog's fetch is under way
            if '"engine started"' in lines[-1]:
                process.send_signal(signal.SIGHUP)  # and now the reloader's
            if '"rules reloaded' in lines[-1]:
                break
    finally:
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=15)
    output = "".join(lines) + rest
    assert "reload requested while starting" in output, output
    assert '"rules reloaded' in output, output
    assert process.returncode == 0, output
