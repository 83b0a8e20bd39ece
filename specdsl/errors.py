"""User-facing errors.

Every mistake a user can make in a spec becomes a :class:`SpecError` carrying the file, line, column,
key path, a stable code and a hint. Stages collect errors and raise them together as a
:class:`SpecErrors`, so a user fixes a whole file in one round trip. Failures at run time (a provider
rejecting a key, a missing source file, a full disk) are :class:`RunError`: they exit with code 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# Secret detection and redaction live with secret references; re-exported here for the spec checks.
from specdsl.secret_shapes import is_secret_key, looks_like_secret, redact_secrets  # noqa: F401

# Exit codes used by the CLI.
EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_SPEC = 2

# Every error code the compiler can emit, with a one-line meaning. docs/spec.md lists them and a test
# asserts each one is exercised.
CODES: dict[str, str] = {
    "S001": "YAML syntax error",
    "S002": "duplicate key in a mapping",
    "S003": "unsafe or unknown YAML tag",
    "S004": "the top level is not a mapping",
    "S005": "the file is empty",
    "S006": "the file is not readable text (binary, bad encoding or too large)",
    "S007": "the document is too deeply nested or too large after alias expansion",
    "S010": "missing or unknown `specdsl:` version",
    "S101": "missing required key",
    "S102": "wrong type",
    "S103": "value out of range or not allowed",
    "S104": "unknown key",
    "S105": "invalid value",
    "S201": "unknown model",
    "S202": "unknown source",
    "S203": "unknown step",
    "S204": "unknown var",
    "S205": "duplicate step id",
    "S206": "cycle between steps",
    "S207": "unknown backend",
    "S208": "unknown op",
    "S209": "unknown recipe",
    "S210": "invalid backend options",
    "S211": "invalid recipe parameters",
    "S212": "unknown training target",
    "S213": "unknown probe",
    "S301": "template syntax error",
    "S302": "template uses a column that does not exist at this step",
    "S303": "template uses an unknown variable",
    "S304": "template expression not allowed by the sandbox",
    "S401": "an op-specific rule is broken",
    "S402": "a step's input has the wrong shape for this op",
    "S403": "a column this op needs does not exist at this step",
    "S404": "a secret is written inline instead of as ${env:NAME}",
    "S405": "a source file is missing or unreadable",
}

# What to do, per code: the hint of an error whose producer gave none (a third-party op's check, say).
# Every producer in specdsl gives its own, more precise one; tests keep this table and CODES in step.
DEFAULT_HINTS: dict[str, str] = {
    "S001": "check the indentation, quotes and brackets near here",
    "S002": "keep one of the two keys (YAML would silently keep only the last)",
    "S003": "remove the tag: specs hold plain YAML values, no `!!python/...` or custom tags",
    "S004": "write the spec as one mapping: `specdsl: 1`, `name:`, `sources:`, `steps:` ...",
    "S005": "a spec starts with `specdsl: 1`, then `name:`, `sources:` and `steps:`",
    "S006": "save the spec as UTF-8 text of at most 2 MB; keep data in source files",
    "S007": "a spec needs only a few levels of nesting: flatten it, or move the data into a source file",
    "S010": "add `specdsl: 1` as the first line",
    "S101": "add the missing key (`specdsl schema` prints what each key takes)",
    "S102": "write a value of the type the message names",
    "S103": "use a value the message allows",
    "S104": "remove the key or fix its spelling (`specdsl schema` prints the keys)",
    "S105": "fix the value as the message says (`specdsl schema` prints what each key takes)",
    "S201": "name a model defined under `models:`, or a train step's id",
    "S202": "name a source defined under `sources:`",
    "S203": "name a step defined under `steps:`",
    "S204": "define it under `vars:`",
    "S205": "give each step an id of its own",
    "S206": "a step may read only steps that do not read it back",
    "S207": "`specdsl plugins` lists the installed backends",
    "S208": "`specdsl plugins` lists the installed ops",
    "S209": "`specdsl plugins` lists the installed recipes",
    "S210": "fix the option as the message says (docs/spec.md lists each backend's options)",
    "S211": "fix the recipe's parameters under `with:` as the message says",
    "S212": "`specdsl plugins` lists the installed training targets",
    "S213": "`specdsl plugins` lists the installed probes",
    "S301": "close each `{{` with `}}` and each `{% ... %}` block with its end tag",
    "S302": "use a column that exists at this step (`specdsl plan` shows each step's columns)",
    "S303": "templates see `row`, `vars` and the names under `vars:`",
    "S304": "templates may read row columns and vars, nothing else",
    "S401": "change the step's parameters as the message says",
    "S402": "read from a step whose output has the shape this op takes",
    "S403": "use a column that exists at this step (`specdsl plan` shows each step's columns)",
    "S404": "put the secret in an environment variable and write `${env:NAME}`",
    "S405": "check the path (relative to the spec's folder) and the format, or declare the source's `columns:`",
}


@dataclass(frozen=True)
class SourcePos:
    """A position in a spec file; line and column are 1-based as editors show them."""

    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class SpecError:
    code: str
    message: str
    pos: SourcePos | None = None
    key_path: tuple[str | int, ...] = ()
    hint: str | None = None

    def headline(self) -> str:
        where = f"{self.pos}: " if self.pos else ""
        return f"{where}error[{self.code}]: {self.message}"

    def render(self, source_lines: Sequence[str] | None = None) -> str:
        """The message as printed: headline, the source line with a caret, and the hint.

        Source lines are shown with anything that looks like a secret replaced by ``***`` (an S404's
        line holds one, and so may the line of any other error on it).
        """
        out = [printable(redact_secrets(self.headline()))]
        if self.pos is not None and source_lines is not None and 0 < self.pos.line <= len(source_lines):
            text = printable(redact_secrets(source_lines[self.pos.line - 1].rstrip("\r\n")))
            if len(text) > 200:  # keep a pathological one-line file readable
                start = max(0, self.pos.col - 100)
                text = text[start : start + 200]
                caret_col = self.pos.col - start
            else:
                caret_col = self.pos.col
            gutter = f"{self.pos.line:>5} | "
            out.append(gutter + text)
            out.append(" " * (len(gutter) + max(caret_col - 1, 0)) + "^")
        if self.key_path:
            out.append(printable(f"  at: {format_key_path(self.key_path)}"))
        if self.hint:
            out.append(printable(f"  hint: {redact_secrets(self.hint)}"))
        return "\n".join(out)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with control characters (a hostile spec's terminal escapes, say) shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", text)


def format_key_path(path: Iterable[str | int]) -> str:
    parts = []
    for p in path:
        parts.append(f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p)))
    return "".join(parts)


class SpecErrors(Exception):
    """One or more user errors in a spec; exit code 2."""

    exit_code = EXIT_SPEC

    def __init__(self, errors: Sequence[SpecError], sources: dict[str, list[str]] | None = None):
        if not errors:
            raise ValueError("SpecErrors needs at least one error")
        self.errors = list(errors)
        self.sources = sources or {}
        super().__init__(self.render())

    def render(self) -> str:
        blocks = []
        for err in self.errors:
            lines = self.sources.get(err.pos.file) if err.pos else None
            blocks.append(err.render(lines))
        n = len(self.errors)
        blocks.append(f"{n} error{'s' if n != 1 else ''}")
        return "\n\n".join(blocks)

    @property
    def codes(self) -> list[str]:
        return [e.code for e in self.errors]


class RunError(Exception):
    """A failure while executing a valid plan (missing data, provider refusal, full disk); exit code 1."""

    exit_code = EXIT_RUNTIME

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None,
                 pos: SourcePos | None = None):
        self.message = message
        self.node = node
        self.hint = hint
        self.pos = pos
        super().__init__(self.render())

    def render(self) -> str:
        where = f"{self.pos}: " if self.pos else ""
        node = f"[node {self.node}] " if self.node else ""
        text = f"{where}error: {node}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class StopRun(Exception):
    """Not a failure: this machine's share of the run ends at this node, and the run exits with code 0.

    A step (or the training target it calls) raises it when the rest of the plan belongs to another
    machine: machine k > 0 of a multi-node training contributes its gradients, but machine 0 writes the
    model and runs the later steps. The node is not committed (this machine holds no output for it) and
    the nodes after it are reported as skipped.
    """

    def __init__(self, message: str):
        self.message = message
        super().__init__(message)


@dataclass
class ErrorSink:
    """Collects errors across a stage so they can be reported together."""

    errors: list[SpecError] = field(default_factory=list)

    def add(self, code: str, message: str, pos: SourcePos | None = None,
            key_path: tuple[str | int, ...] = (), hint: str | None = None) -> None:
        assert code in CODES, code
        # Messages quote values (`'...' is not one of ...`): a secret typed in the wrong place must not leak
        # into any output, --json included.
        message = redact_secrets(message)
        hint = redact_secrets(hint) if hint else DEFAULT_HINTS[code]
        self.errors.append(SpecError(code, message, pos, tuple(key_path), hint))

    def __bool__(self) -> bool:
        return bool(self.errors)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest choice, or listing the choices when none is close."""
    import difflib  # only when there is a mistake to explain

    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if not choices:
        return None
    shown = ", ".join(choices[:12]) + (", ..." if len(choices) > 12 else "")
    return f"expected one of: {shown}"
