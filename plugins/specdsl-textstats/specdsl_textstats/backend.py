"""``template``: a deterministic, offline generation backend for CI, demos and tests.

A model entry like::

    models:
      bot:
        backend: template
        model: canned                      # any name; it is part of the identity
        template: "Answer: {{ prompt | upper }}"
        rules:
          - {match: "(\\d+) \\+ (\\d+)", reply: "Answer: {{ match[1] | int + match[2] | int }}"}
        fail_on: "FAIL"                    # requests whose last user message matches come back as errors

answers every request by rendering a Jinja2 template (sandboxed, strict undefined) over the request:

* ``prompt``   the last user message; ``system`` the first system message (or ``""``);
* ``messages`` every message (a list of ``{role, content}``); ``model`` the entry's ``model``;
* ``params``   the decoding parameters (``max_tokens``, ``temperature``, ``top_p``, ``seed``);
* ``seed``     the request's seed (sample k of a prompt, when a step asks for ``n > 1``, is sent with
  seed + k), so samples can differ;
* ``match``    for a rule's reply, the regex match: ``match[0]`` the whole match, ``match[1]`` the first
  group...; ``named`` its named groups.

The first rule whose ``match`` regex is found in the prompt answers; without a matching rule,
``template`` does (default ``{{ prompt }}``: an echo). A "token" is a whitespace-separated word: token
counts, ``max_tokens`` truncation and ``price_per_1k_tokens`` all use that.

Nothing here imports more than :mod:`re` and :mod:`jinja2`, and only when a method runs.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

from specdsl.contract.hookspecs import GenRequest, GenResult

DEFAULT_TEMPLATE = "{{ prompt }}"
TEMPLATE_NAMES = frozenset({"prompt", "system", "messages", "model", "params", "seed"})
RULE_NAMES = TEMPLATE_NAMES | {"match", "named"}

OPTIONS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "template": {
            "type": "string",
            "description": "Jinja2 reply template (default: '{{ prompt }}', an echo); sees prompt, system, "
                           "messages, model, params, seed",
        },
        "rules": {
            "type": "array",
            "description": "tried in order before `template`: the first whose regex is found in the prompt answers",
            "items": {
                "type": "object",
                "required": ["match", "reply"],
                "additionalProperties": False,
                "properties": {
                    "match": {"type": "string", "minLength": 1, "description": "a Python regex searched in the prompt"},
                    "reply": {"type": "string", "description": "a reply template; also sees `match` and `named`"},
                },
            },
        },
        "fail_on": {
            "type": "string", "minLength": 1,
            "description": "a regex: requests whose prompt matches fail (to rehearse failure handling)",
        },
        "max_words": {
            "type": "integer", "minimum": 1,
            "description": "truncate every reply to this many words (a step's max_tokens also truncates)",
        },
        "price_per_1k_tokens": {
            "type": "number", "minimum": 0,
            "description": "pretend price in USD per 1,000 words in + out (default: 0); not part of the identity",
        },
    },
}


class OptionError(ValueError):
    """A model entry's options are wrong. specdsl reports it as error[S210] on the entry, with ``hint``."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def _env():
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    return SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def _compile(source: str, allowed: frozenset[str], where: str):
    """Compile a template and check the names it uses. Raises ValueError with a user-facing message."""
    from jinja2 import TemplateSyntaxError, meta

    env = _env()
    try:
        ast = env.parse(source)
    except TemplateSyntaxError as exc:
        raise OptionError(f"{where}: template syntax error at line {exc.lineno}: {exc.message}",
                          hint="the template backend's templates are Jinja2, e.g. '{{ prompt | upper }}'") from None
    unknown = sorted(meta.find_undeclared_variables(ast) - allowed)
    if unknown:
        hint = f"this template sees: {', '.join(sorted(allowed))}"
        if unknown[0] in ("row", "vars"):
            hint += "; rows and vars are the step's: render them into the step's `user:` template"
        raise OptionError(f"{where}: template uses unknown name '{unknown[0]}'", hint=hint)
    return env.from_string(source)


def _regex(pattern: str, where: str):
    import re

    try:
        return re.compile(pattern)
    except re.error as exc:
        raise OptionError(f"{where}: invalid regular expression {pattern!r}: {exc}",
                          hint="a Python `re` pattern; quote it with single quotes in YAML") from None


def words(text: str) -> int:
    return len(text.split())


class TemplateBackend:
    """See the module docstring. Stateless: every method takes the entry's options."""

    name = "template"
    version = "1"
    options_schema = OPTIONS_SCHEMA

    # -- what decides outputs -------------------------------------------------------------------------

    def identity(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Everything that changes a reply, with defaults filled in; the price is not part of it.

        Also compiles every template and regex (raising :class:`OptionError`), so a direct caller never
        gets an identity for options that cannot run; specdsl finds the same mistakes earlier, positioned
        at the option, through :meth:`check_options`.
        """
        ident = {
            "model": options["model"],
            "template": options.get("template", DEFAULT_TEMPLATE),
            "rules": [{"match": r["match"], "reply": r["reply"]} for r in options.get("rules", ())],
            "fail_on": options.get("fail_on"),
            "max_words": options.get("max_words"),
        }
        self._compiled(ident)
        return ident

    def check_options(self, options: Mapping[str, Any]) -> list:
        """Every template and regex that does not compile, each at its own option (``specdsl validate``
        reports them as error[S210] at that line and column). Cheap: Jinja2 parsing and ``re`` only."""
        # Imported here: a specdsl old enough to lack OptionProblem never calls this method, and can
        # still load the plugin.
        from specdsl.contract.hookspecs import OptionProblem

        checks = [(("template",), lambda: _compile(options.get("template", DEFAULT_TEMPLATE), TEMPLATE_NAMES,
                                                    "template"))]
        for i, rule in enumerate(options.get("rules", ())):
            checks.append((("rules", i, "match"), lambda r=rule, i=i: _regex(r["match"], f"rules[{i}].match")))
            checks.append((("rules", i, "reply"), lambda r=rule, i=i: _compile(r["reply"], RULE_NAMES,
                                                                               f"rules[{i}].reply")))
        if options.get("fail_on"):
            checks.append((("fail_on",), lambda: _regex(options["fail_on"], "fail_on")))
        problems = []
        for path, compile_it in checks:
            try:
                compile_it()
            except OptionError as exc:
                problems.append(OptionProblem(path, exc.message, exc.hint))
        return problems

    def price(self, options: Mapping[str, Any], input_tokens: int, output_tokens: int) -> float | None:
        return float(options.get("price_per_1k_tokens", 0.0)) * (input_tokens + output_tokens) / 1000.0

    # -- answering ------------------------------------------------------------------------------------

    def generate(self, options: Mapping[str, Any], requests: Sequence[GenRequest],
                 on_result: Callable[[GenResult], None]) -> None:
        ident = {**self.identity(options)}
        template, rules, fail_on = self._compiled(ident)
        for req in requests:
            t0 = time.perf_counter()
            on_result(self._answer(options, ident, template, rules, fail_on, req, t0))

    def _answer(self, options, ident, template, rules, fail_on, req: GenRequest, t0: float) -> GenResult:
        messages = [dict(m) for m in req.messages]
        prompt = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        input_tokens = sum(words(str(m.get("content", ""))) for m in messages)
        if fail_on is not None and fail_on.search(prompt):
            return GenResult(key=req.key, error=f"template backend: prompt matches fail_on {fail_on.pattern!r}",
                             input_tokens=input_tokens, latency_s=time.perf_counter() - t0)
        params = dict(req.params)
        context = {"prompt": prompt, "system": system, "messages": messages, "model": ident["model"],
                   "params": params, "seed": params.get("seed")}
        try:
            for pattern, reply in rules:
                m = pattern.search(prompt)
                if m:
                    text = reply.render(**context, match=[m.group(0), *m.groups()], named=m.groupdict())
                    break
            else:
                text = template.render(**context)
        except Exception as exc:  # noqa: BLE001 - a reply that cannot render fails this request only
            return GenResult(key=req.key, error=f"template backend: {type(exc).__name__}: {exc}",
                             input_tokens=input_tokens, latency_s=time.perf_counter() - t0)
        limit = min(x for x in (ident["max_words"], params.get("max_tokens"), 10**12) if x)
        parts = text.split()
        if len(parts) > limit:
            text = " ".join(parts[:limit])
        output_tokens = min(len(parts), limit)
        return GenResult(key=req.key, text=text, input_tokens=input_tokens, output_tokens=output_tokens,
                         cost=self.price(options, input_tokens, output_tokens) or 0.0,
                         latency_s=time.perf_counter() - t0)

    @staticmethod
    def _compiled(ident: Mapping[str, Any]):
        template = _compile(ident["template"], TEMPLATE_NAMES, "template")
        rules = [(_regex(r["match"], f"rules[{i}].match"), _compile(r["reply"], RULE_NAMES, f"rules[{i}].reply"))
                 for i, r in enumerate(ident["rules"])]
        fail_on = _regex(ident["fail_on"], "fail_on") if ident.get("fail_on") else None
        return template, rules, fail_on
