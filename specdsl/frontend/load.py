"""Safe YAML loading that keeps a source position for every key and value.

PyYAML composes a node graph (with marks) which we turn into plain Python values ourselves, so that:

* every value and every mapping key keeps its line/column (errors point at the exact spot);
* duplicate keys are errors, not silent overwrites;
* only the YAML core tags are accepted (``!!python/object`` and friends are rejected, never executed);
* hostile input fails fast with a positioned error: an event pre-scan bounds nesting depth before the
  (recursive) composer runs, and node expansion is budgeted so an alias bomb cannot blow up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from specdsl.errors import ErrorSink, SourcePos, SpecErrors

MAX_FILE_BYTES = 2 * 1024 * 1024
MAX_DEPTH = 64
MAX_EXPANDED_NODES = 20_000

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_ALLOWED_TAGS = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null", "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq", "tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:merge",
}
KeyPath = tuple[str | int, ...]
# Plain scalars PyYAML (YAML 1.1) leaves as strings but YAML 1.2 reads as floats: exponents without a dot.
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$")
# Hints shared by several errors.
_FLATTEN = "a spec needs only a few levels of nesting: flatten the data, or move it into a source file"
_PLAIN_KEYS = "write each key as a plain name (`name:`), not a list, mapping or `? ` complex key"


def _syntax_hint(problem: str, context: str | None) -> str:
    """What to do about a YAML syntax error, from the parser's words."""
    if "mapping values are not allowed" in problem:
        return "a value that holds `: ` needs quotes (user: \"Q: {{ row.q }}\"), and a key its own line"
    if "could not find expected ':'" in problem:
        return "each line of a mapping is `key: value`; check the indentation and any quote left open"
    if "found character '\\t'" in problem:
        return "indent with spaces; YAML does not allow tabs"
    if "found undefined alias" in problem:
        return "define the anchor (`&name`) before its alias (`*name`)"
    where = f" (while {context.replace('while ', '', 1)})" if context else ""
    return f"check the indentation, quotes and brackets near here{where}"


@dataclass(frozen=True)
class LoadedDoc:
    """A loaded spec: plain data plus where each piece of it came from."""

    file: str
    data: Any
    value_pos: dict[KeyPath, SourcePos] = field(repr=False)
    key_pos: dict[KeyPath, SourcePos] = field(repr=False)
    lines: list[str] = field(repr=False)

    def pos(self, path: KeyPath, *, key: bool = False) -> SourcePos:
        """The position of ``path`` (its key if ``key``), falling back to the nearest parent."""
        table = self.key_pos if key else self.value_pos
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if not key and p in self.key_pos:
                return self.key_pos[p]
            p = p[:-1]
        return self.value_pos.get((), SourcePos(self.file, 1, 1))


def _mark_pos(file: str, mark: Any, lines: list[str] | None = None) -> SourcePos:
    """A YAML mark as a 1-based position; past the end of the text it points just after the last line."""
    line, col = mark.line + 1, mark.column + 1
    if lines is not None and line > len(lines) and lines:
        last = len(lines)
        while last > 1 and not lines[last - 1].strip():
            last -= 1
        line, col = last, len(lines[last - 1].rstrip()) + 1
    return SourcePos(file, line, col)


def _unclosed_quote(text: str, exc: Any) -> Any:
    """The start mark of a quoted string that probably lost its closing quote, or None: the one the error
    is in ("while scanning a quoted scalar"), else the last quoted string before the error that runs over
    several lines (legal YAML, but in a spec it is nearly always a quote left open)."""
    if exc.context and "quoted scalar" in exc.context and exc.context_mark is not None:
        return exc.context_mark
    error_mark = exc.problem_mark or exc.context_mark
    if error_mark is None:
        return None
    last = None
    try:
        for token in yaml.scan(text, Loader=_Loader):
            if token.start_mark.index >= error_mark.index:
                break
            if isinstance(token, yaml.ScalarToken) and token.style in ("'", '"') \
                    and token.end_mark.line > token.start_mark.line:
                last = token.start_mark
    except yaml.YAMLError:
        pass  # the scan stops at the same error; what was found before it stands
    return last


def read_text(path: Path, display: str | None = None) -> str:
    """Read a spec file as UTF-8 text, rejecting binary or oversized input with a positioned error."""
    display = display or str(path)
    sink = ErrorSink()
    try:
        with Path(path).open("rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)  # never read more than the limit of a hostile file
    except OSError as exc:
        sink.add("S006", f"cannot read spec file: {exc.strerror or exc}", SourcePos(display, 1, 1),
                 hint="give the path of a readable YAML file (not a folder)")
        raise SpecErrors(sink.errors)
    if len(raw) > MAX_FILE_BYTES:
        size = Path(path).stat().st_size
        sink.add("S006", f"spec file is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}",
                 SourcePos(display, 1, 1), hint="specs describe data; keep the data in source files")
        raise SpecErrors(sink.errors)
    if b"\x00" in raw:
        at = raw.index(b"\x00")
        sink.add("S006", "spec file contains NUL bytes: it looks binary, not YAML", _byte_pos(display, raw, at),
                 hint="specs are UTF-8 text files")
        raise SpecErrors(sink.errors, {display: _shown_lines(raw, at)})
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        sink.add("S006", f"spec file is not valid UTF-8 (byte 0x{raw[exc.start]:02x})",
                 _byte_pos(display, raw, exc.start), hint="save the file as UTF-8")
        raise SpecErrors(sink.errors, {display: _shown_lines(raw, exc.start)})


def _byte_pos(display: str, raw: bytes, at: int) -> SourcePos:
    """The line and column (in characters, as an editor shows them) of byte offset ``at``."""
    line_start = raw.rfind(b"\n", 0, at) + 1
    col = len(raw[line_start:at].decode("utf-8", "replace")) + 1
    return SourcePos(display, raw.count(b"\n", 0, at) + 1, col)


def _shown_lines(raw: bytes, at: int) -> list[str]:
    """The lines up to the bad byte, printable (undecodable bytes and NULs shown as U+FFFD)."""
    end = raw.find(b"\n", at)
    head = raw[: end if end >= 0 else len(raw)]
    return head.decode("utf-8", "replace").replace("\x00", "\ufffd").split("\n")


def load_yaml_text(text: str, file: str) -> LoadedDoc:
    """Parse YAML text into a :class:`LoadedDoc`, raising :class:`SpecErrors` for every problem."""
    lines = text.splitlines()
    sources = {file: lines}
    sink = ErrorSink()
    if not text.strip() or all(not ln.strip() or ln.lstrip().startswith("#") for ln in lines):
        sink.add("S005", "the spec file is empty", SourcePos(file, 1, 1),
                 hint="start with `specdsl: 1` followed by `name:` and `steps:`")
        raise SpecErrors(sink.errors, sources)

    # Pre-scan events (the C parser is iterative) to bound depth before the recursive composer runs.
    try:
        depth = 0
        for event in yaml.parse(text, Loader=_Loader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    sink.add("S007", f"the document nests deeper than {MAX_DEPTH} levels",
                             _mark_pos(file, event.start_mark), hint="specs are shallow; check for runaway brackets")
                    raise SpecErrors(sink.errors, sources)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        pos = _mark_pos(file, mark, lines) if mark else SourcePos(file, 1, 1)
        problem = exc.problem or "invalid YAML"
        if "nesting depth" in problem:  # libyaml's own depth guard fired before our pre-scan
            sink.add("S007", f"the document nests too deeply ({problem})", pos, hint=_FLATTEN)
        else:
            opened = _unclosed_quote(text, exc)
            if opened is not None:
                # Report where the quote opens: the scanner only notices at the end of the file, or when
                # the quote closes far below on another string's quote.
                quote_pos = _mark_pos(file, opened, lines)
                sink.add("S001", f"YAML syntax error: a quoted string opens here and is not closed on its line "
                                 f"({problem} at line {pos.line})", quote_pos,
                         hint="close the quote on this line (a quote inside the string is doubled: 'it''s', "
                              "or escaped: \"say \\\"hi\\\"\")")
            else:
                sink.add("S001", f"YAML syntax error: {problem}", pos, hint=_syntax_hint(problem, exc.context))
        raise SpecErrors(sink.errors, sources)
    except yaml.YAMLError as exc:  # reader errors (control characters) carry a character index instead
        index = getattr(exc, "position", 0) or 0
        line = text.count("\n", 0, index) + 1
        col = index - (text.rfind("\n", 0, index) + 1) + 1
        reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        sink.add("S001", f"YAML error: {reason}", SourcePos(file, line, col),
                 hint="remove control characters; specs are plain UTF-8 text")
        raise SpecErrors(sink.errors, sources)
    except RecursionError:
        sink.add("S007", "the document is too deeply nested", SourcePos(file, 1, 1), hint=_FLATTEN)
        raise SpecErrors(sink.errors, sources)

    nodes = [n for n in nodes if n is not None]
    if not nodes:
        sink.add("S005", "the spec file holds no YAML document", SourcePos(file, 1, 1),
                 hint="a spec starts with `specdsl: 1`, then `name:`, `sources:` and `steps:` (see specs/ for examples)")
        raise SpecErrors(sink.errors, sources)
    if len(nodes) > 1:
        sink.add("S001", "a spec file holds exactly one YAML document; found several (`---`)",
                 SourcePos(file, nodes[1].start_mark.line + 1, 1),
                 hint="remove the `---` line; put each further spec in a file of its own")
    builder = _Builder(file, sink)
    try:
        data = builder.build(nodes[0], ())
    except _TooLarge:
        raise SpecErrors(sink.errors, sources) from None
    if data is None and not sink:
        sink.add("S005", "the spec file holds an empty YAML document", _mark_pos(file, nodes[0].start_mark),
                 hint="start with `specdsl: 1` followed by `name:` and `steps:`")
    if not isinstance(data, dict) and not sink:
        sink.add("S004", f"the top level must be a mapping, not a {_kind(data)}", _mark_pos(file, nodes[0].start_mark),
                 hint="start the file with `specdsl: 1`")
    if sink:
        raise SpecErrors(sink.errors, sources)
    return LoadedDoc(file, data, builder.value_pos, builder.key_pos, lines)


def load_yaml_file(path: Path | str, display: str | None = None) -> LoadedDoc:
    path = Path(path)
    display = display or str(path)
    return load_yaml_text(read_text(path, display), display)


def _kind(value: Any) -> str:
    return {dict: "mapping", list: "list", str: "string", type(None): "null", int: "number", float: "number",
            bool: "boolean"}.get(type(value), type(value).__name__)


class _TooLarge(Exception):
    """Stops building at once: nothing useful can be reported past an expansion limit."""


class _Builder:
    """Turns composed nodes into Python values, recording positions and collecting errors."""

    def __init__(self, file: str, sink: ErrorSink):
        self.file = file
        self.sink = sink
        self.value_pos: dict[KeyPath, SourcePos] = {}
        self.key_pos: dict[KeyPath, SourcePos] = {}
        self.budget = MAX_EXPANDED_NODES
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self.built: set[int] = set()   # ids of nodes built once: meeting one again means an alias
        self.stack: list[tuple[yaml.Node, bool]] = []  # (node, reached through an alias) being built

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        if len(path) > MAX_DEPTH:  # only reachable through (recursive) aliases; the pre-scan bounds the rest
            self.sink.add("S007", f"aliases expand deeper than {MAX_DEPTH} levels (a recursive alias?)",
                          _mark_pos(self.file, node.start_mark),
                          hint="an alias must not point into the mapping that holds it; write the values out")
            raise _TooLarge
        self.budget -= 1
        if self.budget < 0:
            self.sink.add("S007", f"the document expands to more than {MAX_EXPANDED_NODES:,} values "
                          "(an alias bomb?)", _mark_pos(self.file, self._alias_site(node).start_mark),
                          hint="specs are small; use fewer or shallower aliases")
            raise _TooLarge
        alias = id(node) in self.built
        self.built.add(id(node))
        self.stack.append((node, alias))
        try:
            return self._build(node, path)
        finally:
            self.stack.pop()

    def _alias_site(self, node: yaml.Node) -> yaml.Node:
        """The collection holding the outermost alias being expanded (where the bomb goes off)."""
        for i, (_, alias) in enumerate(self.stack):
            if alias:
                return self.stack[i - 1][0] if i else node
        return node

    def _build(self, node: yaml.Node, path: KeyPath) -> Any:
        pos = _mark_pos(self.file, node.start_mark)
        self.value_pos.setdefault(path, pos)
        if node.tag not in _ALLOWED_TAGS:
            self.sink.add("S003", f"tag '{node.tag}' is not allowed", pos,
                          hint="specs use plain YAML values only; arbitrary-object tags are never executed")
            return None
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, path + (i,)) for i, child in enumerate(node.value)]
        try:
            value = self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            self.sink.add("S105", f"invalid scalar: {exc}", pos, hint="quote the value to keep it as text")
            return None
        if node.tag == "tag:yaml.org,2002:timestamp":
            return node.value  # keep dates as written; specs never need datetime objects
        if isinstance(value, str) and not node.style and _EXP_FLOAT.match(value):
            return float(value)  # `5e-4` is a number (YAML 1.2); YAML 1.1 wants `5.0e-4`
        return value

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict:
        out: dict[Any, Any] = {}
        seen: dict[Any, SourcePos] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged = self.build(value_node, path + ("<<",))
                self.value_pos.pop(path + ("<<",), None)
                sources = merged if isinstance(merged, list) else [merged]
                for src in sources:
                    if isinstance(src, dict):
                        for k, v in src.items():
                            out.setdefault(k, v)
                    else:
                        self.sink.add("S102", f"`<<:` merges mappings, not a {_kind(src)}",
                                      _mark_pos(self.file, value_node.start_mark), path,
                                      hint="write `<<: *anchor` where the anchor names a mapping")
                continue
            key_pos = _mark_pos(self.file, key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                self.sink.add("S102", "mapping keys must be plain scalars", key_pos, hint=_PLAIN_KEYS)
                continue
            key = self.build(key_node, path + ("<key>",))
            self.value_pos.pop(path + ("<key>",), None)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                self.sink.add("S102", "mapping keys must be plain scalars", key_pos, hint=_PLAIN_KEYS)
                continue
            # YAML 1.1 reads plain keys like `on`, `yes`, `no` and `null` as booleans/None; a key is a
            # name, so keep what the user wrote (`on: heldout` means the key "on").
            if not isinstance(key, str):
                key = key_node.value
            if key in seen:
                first = seen[key]
                self.sink.add("S002", f"duplicate key '{key}' (first defined at line {first.line})", key_pos,
                              path + (key,), hint="YAML keeps only one value; remove or rename one of them")
                continue
            seen[key] = key_pos
            self.key_pos[path + (key,)] = key_pos
            out[key] = self.build(value_node, path + (key,))
        return out
