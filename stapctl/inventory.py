"""Target hosts: Ansible inventories (INI or YAML files, read as Ansible reads them) or a
manifest's inline mapping, and Ansible host patterns over them.

A stapctl user's inventory is usually an existing Ansible one, so groups, children,
group and host vars, host ranges (``web[01:03]``) and the ``ansible_*`` connection
variables mean what they mean to Ansible. Every problem is a ManifestError with the
file and line where it is written.
"""

from __future__ import annotations

import ast
import fnmatch
import ipaddress
import itertools
import json
import os
import re
import shlex
import string
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from stapctl.errors import Issue, ManifestError
from stapctl.models import Host, InlineGroup, InlineInventory
from stapctl.schema import did_you_mean, schema_issues
from stapctl.yamldoc import (
    Document,
    KeyPath,
    UnreadableFile,
    format_path,
    parse_yaml,
    read_text,
)

MAX_HOSTS_PER_ENTRY = 10_000  # web[0:99999999] is a typo, not a fleet

_YAML_SUFFIXES = {".yaml", ".yml", ".json"}
_BOOLEAN_WORDS = {"yes": True, "on": True, "true": True, "y": True, "t": True, "1": True,
                  "no": False, "off": False, "false": False, "n": False, "f": False, "0": False}
_INLINE_HOST_FIELDS = {  # inline host settings and the Ansible variable each one sets
    "address": "ansible_host", "port": "ansible_port", "user": "ansible_user",
    "key_file": "ansible_ssh_private_key_file", "become": "ansible_become",
    "python": "ansible_python_interpreter", "known_hosts": "stapctl_known_hosts",
}
# Ansible's other names for the connection variables; when a host has several, the last
# of each tuple wins, as in Ansible's ssh connection plugin.
_CONNECTION_NAMES = {
    "ansible_host": ("ansible_host", "ansible_ssh_host"),
    "ansible_port": ("ansible_port", "ansible_ssh_port"),
    "ansible_user": ("ansible_user", "ansible_ssh_user"),
    "ansible_ssh_private_key_file": ("ansible_private_key_file",
                                     "ansible_ssh_private_key_file"),
}
_ALIAS_OF = {alias: name for name, aliases in _CONNECTION_NAMES.items() for alias in aliases}
# An inventory directory's files that are not inventories, as Ansible skips them
_IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst",
                     ".orig", ".cfg", ".retry")
_VARS_SUFFIXES = ("", ".yml", ".yaml", ".json")  # group_vars/NAME, NAME.yml, ...
SCRIPT_TIMEOUT = 30  # seconds an executable inventory may take to answer
_PATTERN_TERM = re.compile(r"(?:[^,:\[\]]|\[[^\]]*\])+")  # split on , and : outside []
_SUBSCRIPT = re.compile(  # web[0], web[-1], web[0:2], web[1:]
    r"(?P<base>.+)\[(?:(?P<index>-?[0-9]+)|(?P<start>[0-9]+):(?P<end>[0-9]*))\]")
_TEXT_VARIABLES = ("ansible_host", "ansible_user", "ansible_ssh_private_key_file",
                   "ansible_python_interpreter", "stapctl_known_hosts")
_INI_SECTION = re.compile(r"\[(?P<group>[^:\]\s]+)(?::(?P<kind>\w+))?\]\s*(?:[#;].*)?")
_INI_GROUP_NAME = re.compile(r"(?P<group>[^:\]\s]+)\s*(?:[#;].*)?")
_HOST_AND_PORT = re.compile(r"(?P<name>(?:[^:\[\]\s]|\[[^\]]*\])+)(?::(?P<port>[0-9]+))?")
_BRACKETED_IPV6 = re.compile(r"\[(?P<name>[0-9A-Fa-f:.]+)\](?::(?P<port>[0-9]+))?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IP_TEXT = re.compile(r"[0-9A-Za-z:.%_-]+")  # also bounds an IPv6 scope (fe80::1%eth0)
_USER = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_INTERPRETER = re.compile(r"(?:/[A-Za-z0-9._+-]+)+|[A-Za-z0-9_][A-Za-z0-9._+-]*")
_RANGE = re.compile(r"\[(?P<start>[0-9]*|[A-Za-z]):(?P<end>[0-9]+|[A-Za-z])"
                    r"(?::(?P<step>[0-9]+))?\]")

Where = tuple[int | None, int | None, str]  # line, column, key path: where a thing is written


@dataclass
class Group:
    """An inventory group: its own members, child groups and vars."""

    name: str
    hosts: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)


def load_inventory(source: Path | InlineInventory, origin: Document) -> Inventory:
    """Read an inventory as Ansible takes one with -i: an INI or YAML file, an executable
    script (run with ``--list``), a directory of them (all merged), or a comma list of
    hosts (``web1,web2:2222,``); or a manifest's inline inventory. ``group_vars/`` and
    ``host_vars/`` beside the file (in the directory) add their variables.

    ``origin`` is the manifest the inventory serves, as it was read: host-pattern errors
    point at its ``hosts:`` key. A file is read as YAML when it ends in .yaml, .yml or
    .json or its first line is a ``key:``, and as INI otherwise.
    """
    if isinstance(source, InlineInventory):
        builder = _Builder(origin.file)
        for name, variables in source.hosts.items():
            builder.add_host(name, None, variables, (None, None, ""))
        for name, group in source.groups.items():
            builder.group(name).vars.update(group.vars)
            for host in group.hosts:
                builder.add_host(host, name, {}, (None, None, ""))
            for child in group.children:
                builder.add_child(name, child, (None, None, ""))
        return builder.finish(origin)
    builder = _Builder(str(source))
    if "," in str(source) and not source.exists():
        _read_host_list(str(source), builder)
        return builder.finish(origin)
    if source.is_dir():
        for path in _inventory_files(source):
            _read_inventory_file(path, builder)
        if not builder.hosts and not builder.issues:
            builder.report((None, None, ""), "inventory directory has no host in any file")
        _read_vars_directories(source, builder)
    else:
        _read_inventory_file(source, builder)
        _read_vars_directories(source.parent, builder)
    builder.file = str(source)
    return builder.finish(origin)


def _read_inventory_file(path: Path, builder: _Builder) -> None:
    builder.file = str(path)
    if path.is_file() and os.access(path, os.X_OK):
        _read_script_inventory(path, builder)
        return
    try:
        text = read_text(path)
    except UnreadableFile as error:
        raise ManifestError(
            Issue(str(path), error.line, None, "", f"inventory: {error}")) from None
    if _looks_like_yaml(path, text):
        _read_yaml_inventory(parse_yaml(text, str(path)), builder)
    else:
        _read_ini_inventory(text, builder)


def _inventory_files(directory: Path) -> list[Path]:
    """The inventories in a directory and its subdirectories, by name, as Ansible reads
    them: not hidden files, not group_vars/host_vars, not backups or notes."""
    files: list[Path] = []
    for path in sorted(directory.iterdir()):
        if (path.name.startswith(".") or path.name in ("group_vars", "host_vars")
                or path.name.endswith(_IGNORED_SUFFIXES)):
            continue
        files.extend(_inventory_files(path) if path.is_dir() else [path])
    return files


def read_inline_inventory(doc: Document, data: Mapping[str, Any]) -> InlineInventory:
    """A manifest's ``inventory:`` mapping (``data``, found well formed by the schema
    under the key ``inventory`` of ``doc``) as a typed value; ManifestError for what the
    schema cannot see: undefined hosts or groups, cycles, bad connection settings."""
    builder = _Builder(doc.file)
    _read_inline_inventory(data, doc, builder)
    inventory = builder.finish(doc)
    return InlineInventory(
        hosts={name: dict(variables) for name, variables in inventory.hosts.items()},
        groups={name: InlineGroup(tuple(group.hosts), tuple(group.children),
                                  dict(group.vars))
                for name, group in inventory.groups.items()},
    )


def host_vars(host: Host, manifest_vars: Mapping[str, Any],
              extra_vars: Mapping[str, Any]) -> dict[str, Any]:
    """Template variables for one host. Later wins, as in Ansible:

    manifest ``vars`` < group vars (``all`` < parent groups < child groups) < host vars
    < ``-e`` extra vars. ``host.vars`` already holds the inventory part, in that order.
    """
    return {**manifest_vars, **host.vars, **extra_vars}


class Inventory:
    """Hosts and groups, in the order the inventory lists them."""

    def __init__(self, source: str, origin: Document, hosts: dict[str, dict[str, Any]],
                 groups: dict[str, Group], group_files: dict[str, dict[str, Any]] | None = None,
                 host_files: dict[str, dict[str, Any]] | None = None) -> None:
        self.source = source  # the file the inventory was read from (or the manifest)
        self.origin = origin
        self.hosts = hosts  # host name → its own vars
        self.groups = groups  # includes 'all' and 'ungrouped'
        self.group_files = group_files or {}  # group → its group_vars/ variables
        self.host_files = host_files or {}  # host → its host_vars/ variables
        self._children = {name: group.children for name, group in groups.items()}
        self._parents = _parents(groups)
        self._direct_groups: dict[str, list[str]] = {name: [] for name in hosts}
        for name, group in groups.items():
            for host in group.hosts:
                self._direct_groups[host].append(name)
        self._depth = _depths(groups)

    def select(self, pattern: str, limit: str | None = None) -> list[Host]:
        """The hosts an Ansible host pattern selects (then narrowed by ``limit``), in
        inventory order: ``all``, ``*``, globs, ``~regex``, names of hosts and groups,
        ``a:b`` or ``a,b`` union, ``a:&b`` intersection, ``a:!b`` exclusion. A part that
        matches nothing is an error: a typo in ``!canary`` must not trace the canary."""
        selected = self._match(pattern, "hosts")
        if limit is not None:
            selected &= self._match(limit, "--limit")
        if not selected:
            narrowed = f" limited by '{limit}'" if limit is not None else ""
            raise ManifestError(self._pattern_issue(
                "hosts", f"host pattern '{pattern}'{narrowed} selects no host"))
        return [self.host(name) for name in self.hosts if name in selected]

    def host(self, name: str) -> Host:
        """One host with its merged vars, in Ansible's order: the inventory's ``all`` <
        group_vars/all < its parent groups < child groups < their group_vars files <
        the inventory's host vars < host_vars/NAME."""
        groups = self.groups_of(name)
        variables: dict[str, Any] = {}
        for group in groups:  # 'all' first
            variables.update(self.groups[group].vars)
            if group == "all":
                variables.update(self.group_files.get("all", {}))
        for group in groups[1:]:
            variables.update(self.group_files.get(group, {}))
        variables.update(self.hosts[name])
        variables.update(self.host_files.get(name, {}))
        for canonical, aliases in _CONNECTION_NAMES.items():
            value = next((variables[alias] for alias in reversed(aliases)
                          if alias in variables), None)
            if value is not None:
                variables[canonical] = value
        variables["inventory_hostname"] = name
        variables["group_names"] = sorted(group for group in groups if group != "all")
        python = str(variables.get("ansible_python_interpreter", "python3"))
        become = variables.get("ansible_become")
        return Host(
            name=name,
            address=str(variables.get("ansible_host", name)).removeprefix("[").removesuffix("]"),
            port=int(variables.get("ansible_port", 22)),
            user=_optional_text(variables.get("ansible_user")),
            key_file=_optional_text(variables.get("ansible_ssh_private_key_file")),
            become=None if become is None else _boolean(become),
            python="python3" if python.startswith("auto") else python,  # Ansible's discovery
            known_hosts=_optional_text(variables.get("stapctl_known_hosts")),
            vars=variables,
        )

    def groups_of(self, name: str) -> list[str]:
        """The groups a host is in, weakest first: by depth under 'all', then
        ansible_group_priority, then name, as Ansible orders them."""
        mine = _reachable(self._direct_groups[name], self._parents)
        return sorted(mine, key=lambda group: (
            self._depth[group], _priority(self.groups[group].vars), group))

    def members(self, group: str) -> set[str]:
        """The hosts of a group and of its children, grandchildren…"""
        return {host for name in _reachable([group], self._children)
                for host in self.groups[name].hosts}

    def _match(self, pattern: str, where: str) -> set[str]:
        terms = [term.strip() for term in _PATTERN_TERM.findall(pattern) if term.strip()]
        if not terms:
            raise ManifestError(self._pattern_issue(where, f"empty host pattern '{pattern}'"))
        including = [term for term in terms if term[0] not in "&!"] or ["all"]
        selected: set[str] = set()
        unmatched: list[str] = []
        for term in including:
            selected |= self._match_term(term, where, unmatched)
        for term in terms:
            if term[0] == "&":
                selected &= self._match_term(term[1:], where, unmatched)
            elif term[0] == "!":
                selected -= self._match_term(term[1:], where, unmatched)
        if unmatched:
            known = ", ".join(sorted(self.groups))
            raise ManifestError(self._pattern_issue(where, (
                f"in host pattern '{pattern}', {', '.join(repr(t) for t in unmatched)} "
                f"{'matches' if len(unmatched) == 1 else 'match'} no host or group in "
                f"{self.source}; its groups: {known}")))
        return selected

    def _match_term(self, term: str, where: str, unmatched: list[str]) -> set[str]:
        subscript = None if term.startswith("~") else _SUBSCRIPT.fullmatch(term)
        if subscript is not None:
            matched = self._match_term(subscript["base"], where, unmatched)
            return set(self._subscript([name for name in self.hosts if name in matched],
                                       subscript, where))
        if term in ("all", "*"):
            return set(self.hosts)
        if term.startswith("~"):
            try:
                regex = re.compile(term[1:])
            except re.error as error:
                raise ManifestError(self._pattern_issue(
                    where, f"'{term}' is not a valid regular expression: {error}")) from None
            def matches(name: str) -> bool:
                return regex.match(name) is not None
        else:
            def matches(name: str) -> bool:
                return fnmatch.fnmatchcase(name, term)
        found: set[str] = set()
        groups = [group for group in self.groups if matches(group)]
        for group in groups:
            found |= self.members(group)
        if not groups or term.startswith("~") or any(c in term for c in ".?*["):
            found |= {name for name in self.hosts if matches(name)}
        if not found and not groups:
            unmatched.append(term)
        return found

    def _subscript(self, hosts: list[str], subscript: re.Match[str], where: str) -> list[str]:
        """Ansible's ``group[2]``, ``group[-1]``, ``group[0:2]`` (both ends included) and
        ``group[1:]`` over the hosts a pattern matched, in inventory order."""
        if not hosts:
            return []
        if subscript["index"] is not None:
            index = int(subscript["index"])
            if not -len(hosts) <= index < len(hosts):
                raise ManifestError(self._pattern_issue(where, (
                    f"'{subscript[0]}': index {index} is past the {len(hosts)} host(s) of "
                    f"'{subscript['base']}' (from 0 to {len(hosts) - 1}, or -1 for the last)")))
            return [hosts[index]]
        start = int(subscript["start"])
        end = int(subscript["end"]) if subscript["end"] else len(hosts) - 1
        if start >= len(hosts) or end < start:
            raise ManifestError(self._pattern_issue(where, (
                f"'{subscript[0]}' selects none of the {len(hosts)} host(s) of "
                f"'{subscript['base']}': a slice is [FIRST:LAST] from 0, both included")))
        return hosts[start: end + 1]

    def _pattern_issue(self, where: str, message: str) -> Issue:
        """Located at the origin's ``hosts:`` key when it has one (else at no line)."""
        if where != "hosts":
            return Issue(where, None, None, "", message)
        line, column = self.origin.values.get(("hosts",), (None, None))
        return Issue(self.origin.file, line, column, "hosts", message)


# --- building an inventory -------------------------------------------------------------


class _Builder:
    """Collects hosts, groups and problems from any of the three formats; ``finish``
    applies Ansible's rules: every group is under 'all', lone hosts are 'ungrouped'."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.hosts: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, Group] = {"all": Group("all"), "ungrouped": Group("ungrouped")}
        # where, and in which file (an inventory directory has several), each is written
        self.child_written_at: dict[tuple[str, str], tuple[str, Where]] = {}
        self.host_written_at: dict[str, tuple[str, Where]] = {}
        self.group_files: dict[str, dict[str, Any]] = {}
        self.host_files: dict[str, dict[str, Any]] = {}
        self.issues: list[Issue] = []

    def report(self, where: Where, message: str, file: str | None = None) -> None:
        line, column, path = where
        self.issues.append(Issue(file or self.file, line, column, path, message))

    def group(self, name: str) -> Group:
        return self.groups.setdefault(name, Group(name))

    def add_host(self, name: str, group: str | None, variables: Mapping[str, Any],
                 where: Where) -> None:
        self.host_written_at.setdefault(name, (self.file, where))
        self.hosts.setdefault(name, {}).update(variables)
        if group is not None and name not in self.group(group).hosts:
            self.group(group).hosts.append(name)

    def add_child(self, parent: str, child: str, where: Where) -> None:
        if child not in self.group(parent).children:
            self.group(parent).children.append(child)
            self.group(child)
            self.child_written_at[(parent, child)] = (self.file, where)

    def check_variables(self, variables: Mapping[str, Any], where: Where) -> None:
        """Connection variables must make sense where they are written."""
        for key, value in variables.items():
            problem = _connection_variable_problem(key, value)
            if problem:
                line, column, path = where
                self.report((line, column, f"{path}.{key}" if path else key), problem)

    def finish(self, origin: Document) -> Inventory:
        self._check_cycles()
        self._raise_issues()
        children = {child for group in self.groups.values() for child in group.children}
        for name in self.groups:
            if name != "all" and name not in children:
                self.groups["all"].children.append(name)
        grouped = {host for name, group in self.groups.items() if name != "all"
                   for host in group.hosts}
        for host in self.hosts:
            if host not in grouped:
                self.groups["ungrouped"].hosts.append(host)
        self.groups["all"].hosts.clear()  # every host is under 'all' through its groups
        inventory = Inventory(self.file, origin, self.hosts, self.groups, self.group_files,
                              self.host_files)
        self._check_names_used_as_addresses(inventory)
        self._raise_issues()
        return inventory

    def _raise_issues(self) -> None:
        if self.issues:
            raise ManifestError(sorted(self.issues, key=lambda i: (i.line or 0, i.column or 0)))

    def _check_names_used_as_addresses(self, inventory: Inventory) -> None:
        """A host without ``ansible_host`` is reached at its name, which must then be an
        address too (an ``ansible_host`` is checked where it is written)."""
        for name, (file, where) in self.host_written_at.items():
            if "ansible_host" in inventory.host(name).vars:
                continue
            if address_problem(name) is not None:
                self.report(where, f"host '{name}' has no ansible_host, so its name is its "
                                   f"address, but it is not a host name, an IP address or "
                                   f"'local': set ansible_host (address:) or rename it", file)

    def _check_cycles(self) -> None:
        """Report one cycle of children, if any, from the groups that could not be put in
        a parents-first order: each of them has a parent among them."""
        ordered = set(_topological_order(self.groups))
        left = [name for name in self.groups if name not in ordered]
        if not left:
            return
        parents = _parents(self.groups)
        trail = [left[0]]
        while True:  # walk up until a group repeats
            parent = next(name for name in parents[trail[-1]] if name not in ordered)
            if parent in trail:
                cycle = [parent, *reversed(trail[trail.index(parent):])]
                file, where = self.child_written_at.get((parent, trail[-1]),
                                                        (self.file, (None, None, "")))
                self.report(where, f"group '{parent}' is its own ancestor: "
                                   f"{' → '.join(cycle)}", file)
                return
            trail.append(parent)


def _connection_variable_problem(key: str, value: Any) -> str | None:
    key = _ALIAS_OF.get(key, key)
    if key == "ansible_port":
        port = value if isinstance(value, int) and not isinstance(value, bool) else (
            int(value) if isinstance(value, str) and re.fullmatch(r"[0-9]{1,5}", value) else None)
        if port is None or not 1 <= port <= 65535:
            return f"expected a port number from 1 to 65535, got {value!r}"
    elif key == "ansible_become":
        if not isinstance(value, bool | int | str) or (
                not isinstance(value, bool) and str(value).lower() not in _BOOLEAN_WORDS):
            return f"expected true or false (yes/no, 1/0), got {value!r}"
    elif key in _TEXT_VARIABLES and (not isinstance(value, str) or not value):
        return f"expected text, got {value!r}"
    elif key == "ansible_host":
        return address_problem(value)
    elif key == "ansible_user" and not _USER.fullmatch(value):
        return (f"user name {value!r} is not a plain user name: use letters, digits, '.', "
                f"'_' and '-', not starting with '-'")
    elif key == "ansible_python_interpreter" and not _INTERPRETER.fullmatch(value):
        return (f"interpreter {value!r} is not an absolute path (/usr/bin/python3) or a "
                f"command name (python3): no spaces, quotes or shell characters")
    return None


def address_problem(address: str) -> str | None:
    """What is wrong with a host address, or None if it is a host name (RFC 1123), an
    IPv4 or IPv6 address (bracketed or not) or ``local`` (this machine, without SSH)."""
    if address == "local" or _is_host_name(address) or _is_ip_address(address):
        return None
    return (f"{address!r} is not a host name, an IPv4 or IPv6 address or 'local': give "
            f"only the address (letters, digits, '-' and '.'; port and user go in "
            f"ansible_port and ansible_user)")


def _is_host_name(text: str) -> bool:
    labels = text.split(".")
    return (len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)
            and not labels[-1].isdigit())  # 10.0.0.999 is a mistyped address, not a name


def _is_ip_address(text: str) -> bool:
    bracketed = text.startswith("[") and text.endswith("]")
    inner = text[1:-1] if bracketed else text
    if not _IP_TEXT.fullmatch(inner):
        return False
    try:
        address = ipaddress.ip_address(inner)
    except ValueError:
        return False
    return address.version == 6 or not bracketed


def _topological_order(groups: Mapping[str, Group]) -> list[str]:
    """Parents before children (Kahn's algorithm); groups on a cycle are left out."""
    parents_left = {name: 0 for name in groups}
    for group in groups.values():
        for child in group.children:
            parents_left[child] += 1
    ready = [name for name, count in parents_left.items() if count == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for child in groups[name].children:
            parents_left[child] -= 1
            if parents_left[child] == 0:
                ready.append(child)
    return order


def _parents(groups: Mapping[str, Group]) -> dict[str, list[str]]:
    parents: dict[str, list[str]] = {name: [] for name in groups}
    for name, group in groups.items():
        for child in group.children:
            parents[child].append(name)
    return parents


def _depths(groups: Mapping[str, Group]) -> dict[str, int]:
    """Each group's longest distance below 'all', as Ansible counts a group's depth."""
    depth = dict.fromkeys(groups, 0)
    for name in _topological_order(groups):
        for child in groups[name].children:
            depth[child] = max(depth[child], depth[name] + 1)
    return depth


def _reachable(start: list[str], edges: Mapping[str, list[str]]) -> set[str]:
    seen = set(start)
    pending = list(start)
    while pending:
        for following in edges[pending.pop()]:
            if following not in seen:
                seen.add(following)
                pending.append(following)
    return seen


def _boolean(value: Any) -> bool:
    return value if isinstance(value, bool) else _BOOLEAN_WORDS[str(value).lower()]


def _optional_text(value: Any) -> str | None:
    return None if value is None else str(value)


def _priority(variables: Mapping[str, Any]) -> int:
    priority = variables.get("ansible_group_priority", 1)
    return priority if isinstance(priority, int) else 1


def expand_host_pattern(text: str) -> tuple[list[str], int | None]:
    """Host names and port in an inventory host entry: ``web[01:03]:2222`` →
    ``(['web01', 'web02', 'web03'], 2222)``; ValueError for a malformed one."""
    match = _BRACKETED_IPV6.fullmatch(text) if text.count(":") > 2 else None
    if match is None and text.count(":") > 1 and "[" not in text:
        return [text], None  # a bare IPv6 address
    match = match or _HOST_AND_PORT.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}' is not a host name, a host range or host:port")
    port = int(match["port"]) if match["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise ValueError(f"port {port} in '{text}' is not from 1 to 65535")
    return _expand_ranges(match["name"]), port


def _expand_ranges(name: str) -> list[str]:
    """``r[1:2]-n[a:b]`` → r1-na, r1-nb, r2-na, r2-nb."""
    pieces: list[list[str]] = []
    count, position = 1, 0
    for found in _RANGE.finditer(name):
        pieces.append([name[position: found.start()]])
        values = _range_values(name, found)
        count *= len(values)
        if count > MAX_HOSTS_PER_ENTRY:
            raise ValueError(f"'{name}': more than {MAX_HOSTS_PER_ENTRY} hosts in one entry")
        pieces.append(values)
        position = found.end()
    pieces.append([name[position:]])
    if any("[" in piece[0] or "]" in piece[0] for piece in pieces[::2]):
        raise ValueError(f"'{name}': a host range is written [START:END] or "
                         f"[START:END:STEP], e.g. web[01:10]")
    return ["".join(parts) for parts in itertools.product(*pieces)]


def _range_values(name: str, found: re.Match[str]) -> list[str]:
    """The values of one ``[START:END:STEP]``, counted before they are made."""
    start, end, step = found["start"] or "0", found["end"], int(found["step"] or 1)
    if start.isdigit() != end.isdigit():
        raise ValueError(f"'{name}': a range goes from a number to a number or from a "
                         f"letter to a letter")
    if step < 1:
        raise ValueError(f"'{name}': a range's step is 1 or more")
    if start.isdigit():
        width = len(start) if start.startswith("0") and len(start) > 1 else 0
        if width and len(end) != width:
            raise ValueError(f"'{name}': a zero-padded range needs ends of equal width")
        if (int(end) - int(start)) // step >= MAX_HOSTS_PER_ENTRY:
            raise ValueError(f"'{name}': more than {MAX_HOSTS_PER_ENTRY} hosts in one entry")
        values = [str(number).zfill(width)
                  for number in range(int(start), int(end) + 1, step)]
    else:
        letters = string.ascii_letters
        values = list(letters[letters.index(start): letters.index(end) + 1: step])
    if not values:
        raise ValueError(f"'{name}': the range is empty (its start is after its end)")
    return values


# --- the formats -----------------------------------------------------------------------


def _read_host_list(text: str, builder: _Builder) -> None:
    """``-i web1,web2:2222,``: hosts in no group, as Ansible's host_list plugin reads them."""
    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        builder.report((None, None, ""), "the comma list names no host: write -i host1,host2,")
    for entry in entries:
        where: Where = (None, None, entry)
        try:
            names, port = expand_host_pattern(entry)
        except ValueError as error:
            builder.report(where, str(error))
            continue
        for name in names:
            builder.add_host(name, None, {} if port is None else {"ansible_port": port}, where)


def _read_script_inventory(path: Path, builder: _Builder) -> None:
    """An executable inventory, as Ansible's script plugin runs it: ``PATH --list``
    prints JSON groups (``{"web": {"hosts": [...], "vars": {...}, "children": [...]}}``
    or ``{"web": [...]}``) and ``_meta.hostvars``; without ``_meta``, ``PATH --host NAME``
    prints each host's vars."""
    groups = _script_json(path, "--list")
    meta = groups.pop("_meta", None)
    listed: dict[str, None] = {}  # the hosts it names, in order
    if meta is not None and not (isinstance(meta, dict)
                                 and isinstance(meta.get("hostvars", {}), dict)):
        _script_problem(path, "--list", '"_meta" must be {"hostvars": {HOST: {VAR: VALUE}}}')
    for name, body in groups.items():
        if isinstance(body, list):
            body = {"hosts": body}
        if not _is_script_group(body):
            _script_problem(path, "--list", f"group {name!r} must be a list of host names "
                            'or {"hosts": [...], "vars": {...}, "children": [...]}')
        builder.group(name).vars.update(body.get("vars", {}))
        builder.check_variables(body.get("vars", {}), (None, None, f"{name}.vars"))
        for host in body.get("hosts", []):
            builder.add_host(host, None if name == "all" else name, {}, (None, None, host))
            listed.setdefault(host, None)
        for child in body.get("children", []):
            builder.add_child(name, child, (None, None, f"{name}.children"))
    for host in listed:  # the script's own hosts, not those of other files beside it
        if meta is not None:
            variables = meta.get("hostvars", {}).get(host, {})
        else:
            variables = _script_json(path, "--host", host)
        if not isinstance(variables, dict):
            _script_problem(path, *(["--list"] if meta is not None else ["--host", host]),
                            f"the vars of host {host!r} must be a mapping")
        builder.check_variables(variables, (None, None, host))
        builder.hosts[host].update(variables)


def _is_script_group(body: Any) -> bool:
    """A group as a script lists it: ``{"hosts": [NAME…], "vars": {…}, "children": [NAME…]}``,
    every key optional."""
    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(item, str) and item for item in value)
    return (isinstance(body, dict) and names(body.get("hosts", []))
            and names(body.get("children", [])) and isinstance(body.get("vars", {}), dict))


def _script_json(path: Path, *arguments: str) -> dict[str, Any]:
    """What an inventory script prints, as a JSON object; ManifestError if it fails,
    takes more than SCRIPT_TIMEOUT or prints anything else."""
    try:
        done = subprocess.run([str(path.absolute()), *arguments], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=SCRIPT_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        _script_problem(path, *arguments, f"gave no answer within {SCRIPT_TIMEOUT}s")
    except OSError as error:
        _script_problem(path, *arguments, f"cannot be run: {error.strerror} (an "
                        "executable file is run as an inventory script; clear its "
                        "executable bit if it is an INI or YAML file)")
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        _script_problem(path, *arguments, f"failed with exit code {done.returncode}"
                        + (f": {said[-1][:300]}" if said else ""))
    try:
        answer = json.loads(done.stdout)
    except (ValueError, RecursionError) as error:
        _script_problem(path, *arguments, f"did not print JSON: {error}")
    if not isinstance(answer, dict):
        _script_problem(path, *arguments, "must print a JSON object of groups")
    return answer


def _script_problem(path: Path, *arguments_and_message: str) -> NoReturn:
    *arguments, problem = arguments_and_message
    raise ManifestError(Issue(str(path), None, None, "",
                              f"inventory script `{' '.join([path.name, *arguments])}` "
                              f"{problem}"))


def _read_vars_directories(base: Path, builder: _Builder) -> None:
    """``group_vars/`` and ``host_vars/`` in ``base``: for each group and host, the file
    named after it (bare, .yml, .yaml or .json) and every file in the directory named
    after it, in name order, later files winning, as Ansible reads them. Files for
    groups or hosts not in the inventory are ignored, as Ansible ignores them."""
    for kind, names, found in (("group_vars", list(builder.groups), builder.group_files),
                               ("host_vars", list(builder.hosts), builder.host_files)):
        folder = base / kind
        if not folder.is_dir():
            continue
        for name in names:
            variables: dict[str, Any] = {}
            for suffix in _VARS_SUFFIXES:
                path = folder / f"{name}{suffix}"
                files = _vars_files(path) if path.is_dir() else [path] if path.is_file() else []
                for file in files:
                    variables.update(_read_vars_file(file, builder))
            if variables:
                found[name] = variables


def _vars_files(directory: Path) -> list[Path]:
    files: list[Path] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_dir():
            files.extend(_vars_files(path))
        elif path.suffix in _VARS_SUFFIXES:
            files.append(path)
    return files


def _read_vars_file(path: Path, builder: _Builder) -> dict[str, Any]:
    """One group_vars or host_vars file: a YAML mapping of variables."""
    try:
        doc = parse_yaml(read_text(path), str(path))
    except UnreadableFile as error:
        builder.report((error.line, None, ""), f"variables file: {error}", str(path))
        return {}
    builder.issues.extend(doc.issues)
    if doc.data is None:
        return {}
    if not isinstance(doc.data, dict):
        builder.report((1, 1, ""), "a variables file holds a mapping of NAME: VALUE",
                       str(path))
        return {}
    for key, value in doc.data.items():
        problem = _connection_variable_problem(str(key), value)
        if problem:
            line, column = doc.position((key,)) or (None, None)
            builder.report((line, column, str(key)), problem, str(path))
    return dict(doc.data)


# --- the file formats ------------------------------------------------------------------


def _looks_like_yaml(path: Path, text: str) -> bool:
    if path.suffix in _YAML_SUFFIXES:
        return True
    for line in text.splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            return not line.startswith("[") and line.endswith(":")
    return False


def _read_ini_inventory(text: str, builder: _Builder) -> None:
    """Ansible's INI format: ``[group]`` host lines with inline ``key=value`` vars,
    ``[group:vars]`` and ``[group:children]``; values are Python literals if they parse
    as one (``2222`` → 2222), text otherwise, as Ansible reads them."""
    group, kind = "ungrouped", "hosts"
    declared = {"all", "ungrouped"}
    pending: list[tuple[str, Where]] = []  # groups used before they are declared
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        section = f"[{group}]" if kind == "hosts" else f"[{group}:{kind}]"
        where: Where = (number, 1, section)
        header = _INI_SECTION.fullmatch(line)
        if header:
            group, kind = header["group"], header["kind"] or "hosts"
            if kind not in ("hosts", "vars", "children"):
                builder.report((number, 1, line), f"unknown section type '{kind}': use "
                               f"[{group}], [{group}:vars] or [{group}:children]")
                kind = "skip"
            elif kind == "vars":
                pending.append((group, (number, 1, line)))
            else:
                declared.add(group)
                builder.group(group)
        elif line.startswith("["):
            builder.report(where, f"'{line}' is not a section header: write [group], "
                                  f"[group:vars] or [group:children], without spaces")
        elif kind == "hosts":
            _read_ini_host_line(line, group, where, builder)
        elif kind == "vars":
            key, equals, value = line.partition("=")
            if not equals or not key.strip():
                builder.report(where, f"expected key=value, got '{line}'")
                continue
            variables = {key.strip(): _ini_value(value.strip())}
            builder.check_variables(variables, where)
            builder.group(group).vars.update(variables)
        elif kind == "children":
            child = _INI_GROUP_NAME.fullmatch(line)
            if child is None:
                builder.report(where, f"expected a group name, got '{line}'")
                continue
            builder.add_child(group, child["group"], where)
            pending.append((child["group"], where))
    for name, where in pending:
        if name not in declared:
            builder.report(where, f"group '{name}' is used but never declared: add a "
                                  f"[{name}] section" + did_you_mean(name, sorted(declared)))


def _read_ini_host_line(line: str, group: str, where: Where, builder: _Builder) -> None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as error:
        builder.report(where, f"cannot read this host line: {error}")
        return
    try:
        names, port = expand_host_pattern(tokens[0])
    except ValueError as error:
        builder.report(where, str(error))
        return
    variables: dict[str, Any] = {} if port is None else {"ansible_port": port}
    for token in tokens[1:]:
        key, equals, value = token.partition("=")
        if not equals or not key:
            builder.report(where, f"expected key=value after the host name, got '{token}'")
            return
        variables[key] = _ini_value(value)
    where = (where[0], where[1], tokens[0])
    builder.check_variables(variables, where)
    for name in names:
        builder.add_host(name, group, variables, where)


def _ini_value(text: str) -> Any:
    """A Python literal if the text is one (as Ansible's INI reader does), else the text."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            value = ast.literal_eval(text)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text
    if isinstance(value, tuple):
        return list(value)
    return value if value is None or isinstance(value, str | int | float | list | dict) else text


def _read_yaml_inventory(doc: Document, builder: _Builder) -> None:
    """Ansible's YAML format: top-level groups (usually 'all'), each with ``hosts`` (a
    mapping of names, ranges allowed, to vars), ``children`` (nested groups), ``vars``."""
    builder.issues.extend(doc.issues)
    found = schema_issues(doc, doc.data, "inventory.schema.json",
                                                  "ansible_inventory")
    builder.issues.extend(issue for _, issue in found)
    if found or doc.data is None:
        return
    for name, body in doc.data.items():
        _read_yaml_group(doc, builder, name, body, (name,))


def _read_yaml_group(doc: Document, builder: _Builder, name: str, body: Any,
                     path: KeyPath) -> None:
    builder.group(name)
    body = body or {}
    group_vars = body.get("vars") or {}
    builder.check_variables(group_vars, _where(doc, path + ("vars",)))
    builder.group(name).vars.update(group_vars)
    for entry, variables in (body.get("hosts") or {}).items():
        where = _where(doc, path + ("hosts", entry), of_key=True)
        try:
            names, port = expand_host_pattern(entry)
        except ValueError as error:
            builder.report(where, str(error))
            continue
        variables = {**({} if port is None else {"ansible_port": port}), **(variables or {})}
        builder.check_variables(variables, where)
        for host in names:
            builder.add_host(host, None if name == "all" else name, variables, where)
    for child, child_body in (body.get("children") or {}).items():
        child_path = path + ("children", child)
        builder.add_child(name, child, _where(doc, child_path, of_key=True))
        _read_yaml_group(doc, builder, child, child_body, child_path)


def _read_inline_inventory(data: Mapping[str, Any], doc: Document, builder: _Builder) -> None:
    """A manifest's ``inventory:`` mapping: ``hosts`` with settings, ``groups`` listing
    hosts and children, ``vars`` for all. Located in ``doc`` under the key ``inventory``."""
    root: KeyPath = ("inventory",)
    hosts: dict[str, Any] = {name: settings or {} for name, settings in
                             (data.get("hosts") or {}).items()}
    groups: dict[str, Any] = {name: body or {} for name, body in
                              (data.get("groups") or {}).items()}
    all_vars = data.get("vars") or {}
    builder.check_variables(all_vars, _where(doc, root + ("vars",)))
    builder.group("all").vars.update(all_vars)
    for name, settings in hosts.items():
        variables = dict(settings.get("vars") or {})
        builder.check_variables(variables, _where(doc, root + ("hosts", name, "vars")))
        for key, value in settings.items():
            if key in _INLINE_HOST_FIELDS:
                variable = _INLINE_HOST_FIELDS[key]
                problem = _connection_variable_problem(variable, value)
                if problem:
                    builder.report(_where(doc, root + ("hosts", name, key)), problem)
                variables[variable] = value
        builder.add_host(name, None, variables,
                         _where(doc, root + ("hosts", name), of_key=True))
    for name, body in groups.items():
        path = root + ("groups", name)
        group_vars = body.get("vars") or {}
        builder.check_variables(group_vars, _where(doc, path + ("vars",)))
        builder.group(name).vars.update(group_vars)
        for index, host in enumerate(body.get("hosts") or []):
            if host in hosts:
                builder.add_host(host, name, {}, _where(doc, path + ("hosts", index)))
            else:
                builder.report(_where(doc, path + ("hosts", index)),
                               f"host '{host}' is not defined under inventory.hosts"
                               + did_you_mean(host, sorted(hosts)))
        for index, child in enumerate(body.get("children") or []):
            if child in groups:
                builder.add_child(name, child, _where(doc, path + ("children", index)))
            else:
                builder.report(_where(doc, path + ("children", index)),
                               f"group '{child}' is not defined under inventory.groups"
                               + did_you_mean(child, sorted(groups)))


def _where(doc: Document, path: KeyPath, *, of_key: bool = False) -> Where:
    line, column = doc.position(path, of_key=of_key) or (None, None)
    return line, column, format_path(path)


