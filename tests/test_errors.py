"""One test per error code: each spec mistake gives its code, message, line, column, caret and hint.

Every case writes a small spec into a temporary folder (beside a tiny data file), compiles it the way
`specdsl validate` does and checks the first error exactly, and what the user sees when it is printed.
``test_every_code_is_exercised`` keeps this file and :data:`specdsl.errors.CODES` in step.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from specdsl import api
from specdsl.errors import CODES, RunError, SpecError, SpecErrors, redact_secrets
from specdsl.plugins import Registry, default_registry

PROBLEMS = [
    {"id": "p1", "category": "addition", "question": "What is 2 + 3?", "answer": "5"},
    {"id": "p2", "category": "subtraction", "question": "What is 9 - 4?", "answer": "5"},
]

# Lines 1-9; a case's steps start on line 10.
HEAD = """\
specdsl: 1
name: t
models:
  teacher: {model: smollm2-135m-instruct}
sources:
  problems: {path: problems.jsonl}
vars:
  greeting: hello
steps:
"""

EXERCISED: set[str] = set()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    monkeypatch.chdir(tmp_path)  # errors show paths relative to the working directory: "s.yaml"
    return tmp_path


def compile_errors(workdir: Path, text: str | bytes, *, identities: bool = False, registry=None) -> SpecErrors:
    path = workdir / "s.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecErrors) as info:
        api.compile_spec(path, identities=identities, registry=registry)
    return info.value


def check(exc: SpecErrors, code: str, line: int, col: int, message: str, *, hint: str | None = None,
          index: int = 0, caret: bool = True) -> SpecError:
    """Assert error ``index`` exactly, and that its printed form shows the line, a caret and the hint."""
    assert all(e.code in CODES for e in exc.errors)
    err = exc.errors[index]
    assert (err.code, err.pos.file, err.pos.line, err.pos.col) == (code, "s.yaml", line, col), exc.render()
    assert message in err.message, err.message
    # Every error says what to do about it (issue 14: a fifth of them did not).
    assert err.hint and err.hint.strip(), f"error[{code}] has no hint: {err.message}"
    if hint is not None:
        assert hint in err.hint, err.hint
    printed = exc.render()
    block = err.render(exc.sources.get("s.yaml"))
    assert block in printed
    lines = block.splitlines()
    assert lines[0] == f"s.yaml:{line}:{col}: error[{code}]: {err.message}"
    if caret:
        source = redact_secrets(exc.sources["s.yaml"][line - 1])
        gutter = f"{line:>5} | "
        assert lines[1].startswith(gutter) and lines[1][len(gutter):] in source, lines[1]
        assert lines[2] == " " * (len(gutter) + col - 1) + "^", "\n" + block
    if err.hint:
        assert f"  hint: {err.hint}" in lines
    EXERCISED.add(code)
    return err


def spec(steps: str, head: str = HEAD) -> str:
    return head + steps


GEN = "  - id: answers\n    generate: {from: problems, model: teacher, user: '{{ row.question }}'}\n"  # 10-11


# --------------------------------------------------------------------------------------------------
# Loading (S0xx)
# --------------------------------------------------------------------------------------------------


def test_S001_yaml_syntax_error_points_at_the_problem(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: t\nsteps: [\n")
    check(exc, "S001", 3, 9, "YAML syntax error", hint="parsing a flow node")


def test_S001_unclosed_quote_at_end_of_file_points_where_it_opens(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: 'abc\n\n")
    check(exc, "S001", 2, 7, "found unexpected end of stream", hint="close the quote")


def test_S001_several_documents(workdir):
    exc = compile_errors(workdir, spec(GEN) + "---\nname: other\n")
    check(exc, "S001", 13, 1, "exactly one YAML document", caret=True)


def test_S002_duplicate_key(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: a\nname: b\nsteps: []\n")
    err = check(exc, "S002", 3, 1, "duplicate key 'name' (first defined at line 2)", hint="YAML keeps only one")
    assert err.key_path == ("name",)


def test_S003_unsafe_tag_is_rejected_and_never_executed(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: !!python/object/apply:os.system ['touch PWNED']\nsteps: []\n")
    check(exc, "S003", 2, 7, "tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed",
          hint="never executed")
    assert not (workdir / "PWNED").exists()


def test_S003_custom_local_tag(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: !secret t\nsteps: []\n")
    check(exc, "S003", 2, 7, "tag '!secret' is not allowed")


def test_S004_top_level_must_be_a_mapping(workdir):
    exc = compile_errors(workdir, "- specdsl: 1\n- name: t\n")
    check(exc, "S004", 1, 1, "the top level must be a mapping, not a list", hint="specdsl: 1")


def test_S005_empty_file(workdir):
    exc = compile_errors(workdir, "")
    check(exc, "S005", 1, 1, "the spec file is empty", hint="specdsl: 1", caret=False)
    assert "|" not in exc.render()  # nothing to show: no source line, no caret


def test_S005_only_comments(workdir):
    exc = compile_errors(workdir, "# a spec, some day\n\n")
    check(exc, "S005", 1, 1, "the spec file is empty", hint="specdsl: 1")


def test_S006_nul_bytes(workdir):
    exc = compile_errors(workdir, b"specdsl: 1\nname: a\x00b\n")
    check(exc, "S006", 2, 8, "NUL bytes", hint="UTF-8 text")
    assert "\x00" not in exc.render()


def test_S006_bad_utf8_points_at_the_byte(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: é".encode() + b"\xff\xfe\n")
    check(exc, "S006", 2, 8, "not valid UTF-8 (byte 0xff)", hint="save the file as UTF-8")


def test_S006_huge_file_is_refused_before_parsing(workdir):
    start = time.process_time()  # CPU time: the work done, not how busy the machine is
    exc = compile_errors(workdir, "specdsl: 1\nname: t\n# " + "x" * (3 * 1024 * 1024) + "\n")
    assert time.process_time() - start < 1
    check(exc, "S006", 1, 1, "the limit is 2,097,152", hint="keep the data in source files", caret=False)


def test_S007_alias_bomb_is_rejected_fast(workdir):
    lines = ["specdsl: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")  # 10**10 values if expanded
    start = time.process_time()  # CPU time: the work done, not how busy the machine is
    exc = compile_errors(workdir, "\n".join(lines) + "\n")
    assert time.process_time() - start < 1
    check(exc, "S007", 6, 5, "expands to more than 20,000 values", hint="fewer or shallower aliases")


def test_S007_recursive_alias(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: &x [*x]\n")
    check(exc, "S007", 2, 7, "aliases expand deeper than 64 levels")


@pytest.mark.parametrize("style", ["flow", "block", "mapping"])
def test_S007_5000_levels_of_nesting_rejected_fast(workdir, style):
    if style == "flow":
        text = "specdsl: 1\nname: " + "[" * 5000 + "]" * 5000 + "\n"
    elif style == "block":
        text = "specdsl: 1\nname:\n  " + "- " * 5000 + "x\n"
    else:
        text = "specdsl: 1\nname: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"
    start = time.process_time()  # CPU time: the work done, not how busy the machine is
    exc = compile_errors(workdir, text)
    assert time.process_time() - start < 1
    err = exc.errors[0]
    assert err.code == "S007" and err.pos.line >= 2 and err.pos.col >= 1
    assert "nests" in err.message
    EXERCISED.add("S007")


def test_S010_missing_version(workdir):
    exc = compile_errors(workdir, "name: t\nsteps:\n" + GEN)
    check(exc, "S010", 1, 1, "missing `specdsl:` version key", hint="add `specdsl: 1`")
    assert exc.codes == ["S010"]


def test_S010_unknown_version(workdir):
    exc = compile_errors(workdir, spec(GEN).replace("specdsl: 1", "specdsl: 2"))
    check(exc, "S010", 1, 10, "unknown spec version 2", hint="reads version 1")


# --------------------------------------------------------------------------------------------------
# Schema (S1xx)
# --------------------------------------------------------------------------------------------------


def test_S101_missing_required_key(workdir):
    exc = compile_errors(workdir, spec("  - id: a\n    generate: {from: problems, user: '{{ row.question }}'}\n"))
    check(exc, "S101", 11, 5, "missing required key 'model' in steps[0].generate")


def test_S101_step_without_an_op(workdir):
    exc = compile_errors(workdir, spec("  - id: a\n"))
    check(exc, "S101", 10, 5, "step 'a' names no op", hint="generate")


def test_S102_wrong_type(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: a\n    generate: {from: problems, model: teacher, user: hi, max_tokens: many}\n"))
    check(exc, "S102", 11, 70, "steps[0].generate.max_tokens must be an integer, not a string ('many')")


def test_S103_value_out_of_range(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: a\n    generate: {from: problems, model: teacher, user: hi, temperature: 9}\n"))
    check(exc, "S103", 11, 71, "steps[0].generate.temperature: 9 is greater than the maximum of 5")


def test_S103_enum_lists_the_allowed_values(workdir):
    exc = compile_errors(workdir, spec("  - id: a\n    filter: {from: problems, where: '1', keep: some}\n"))
    check(exc, "S103", 11, 48, "'some' is not one of", hint="allowed: 'matched', 'unmatched'")


def test_S104_unknown_key_with_did_you_mean_on_a_model_entry(workdir):
    text = spec(GEN).replace("{model: smollm2-135m-instruct}", "{model: smollm2-135m-instruct, max_new_token: 64}")
    exc = compile_errors(workdir, text)
    err = check(exc, "S104", 4, 43, "unknown key 'max_new_token'", hint="did you mean 'max_new_tokens'?")
    assert err.key_path == ("models", "teacher", "max_new_token")


def test_S104_unknown_top_level_key(workdir):
    exc = compile_errors(workdir, "specdsl: 1\nname: t\nstep:\n" + GEN)
    check(exc, "S104", 3, 1, "unknown key 'step'", hint="did you mean 'steps'?", index=1)
    assert exc.codes == ["S101", "S104"]  # `steps` is missing, `step` is unknown


def test_S105_invalid_regular_expression_in_a_filter(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: a\n    filter: {from: problems, match: {field: question, gold: answer, rule: regex,"
        " pattern: '(unclosed'}}\n"))
    check(exc, "S105", 11, 91, "invalid regular expression: missing ), unterminated subpattern")


def test_S105_invalid_model_name(workdir):
    exc = compile_errors(workdir, spec(GEN).replace("  teacher:", "  my teacher:").replace("model: teacher", "model: x"))
    check(exc, "S105", 4, 3, "invalid name 'my teacher' under models", hint="names start with a letter")


# --------------------------------------------------------------------------------------------------
# References and plugins (S2xx)
# --------------------------------------------------------------------------------------------------


def test_S201_unknown_model(workdir):
    exc = compile_errors(workdir, spec(GEN.replace("model: teacher", "model: teachr")))
    check(exc, "S201", 11, 39, "unknown model 'teachr'", hint="did you mean 'teacher'?")


def test_S201_a_condition_model_must_be_an_evaluated_model(workdir):
    """A model only a probe condition names would be outside the node's fingerprint and order."""
    steps = ("  - id: score\n    evaluate: {models: [teacher], on: problems, probes: [{probe: accuracy, "
             "conditions: [{name: a, model: teacher}, {name: b, model: other}]}]}\n")
    head = HEAD.replace("models:\n", "models:\n  other: {model: smollm2-135m-instruct}\n")
    exc = compile_errors(workdir, spec(steps, head))
    check(exc, "S201", 12, 133, "model 'other' is not among this step's `models:`",
          hint="add it: models: [teacher, other]")


def test_S202_unknown_source(workdir):
    exc = compile_errors(workdir, spec(GEN.replace("from: problems", "from: problem")))
    check(exc, "S202", 11, 22, "unknown source 'problem'", hint="did you mean 'problems'?")
    assert exc.codes == ["S202"]  # the template's row.question is not blamed on the missing input


def test_S203_unknown_step(workdir):
    exc = compile_errors(workdir, spec(GEN + "  - id: kept\n    filter: {from: answer, where: '{{ row.response }}'}\n"))
    check(exc, "S203", 13, 20, "unknown step 'answer'", hint="did you mean 'answers'?")
    assert exc.codes == ["S203"]


def test_S204_unknown_var(workdir):
    exc = compile_errors(workdir, spec(GEN.replace("{{ row.question }}", "{{ vars.greting }} {{ row.question }}")))
    check(exc, "S204", 11, 58, "template uses unknown var 'vars.greting'", hint="did you mean 'greeting'?")


def test_S205_duplicate_step_id(workdir):
    exc = compile_errors(workdir, spec(GEN + GEN.replace("from: problems", "from: answers")))
    check(exc, "S205", 12, 9, "step id 'answers' is already used by the step at line 10",
          hint="share one namespace")


def test_S205_step_id_equal_to_a_source_name(workdir):
    exc = compile_errors(workdir, spec(GEN.replace("id: answers", "id: problems")))
    check(exc, "S205", 10, 9, "step id 'problems' is already used by source 'problems' (line 6)")


def test_S206_cycle(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: a\n    map: {from: c, columns: {x: '1'}}\n"
        "  - id: b\n    map: {from: a, columns: {y: '2'}}\n"
        "  - id: c\n    map: {from: b, columns: {z: '3'}}\n"))
    check(exc, "S206", 11, 5, "steps form a cycle: a -> c -> b -> a", hint="do not read it back")


def test_S207_unknown_backend_lists_installed_ones(workdir):
    exc = compile_errors(workdir, spec(GEN).replace("{model: smollm2", "{backend: vllm, model: smollm2"))
    err = check(exc, "S207", 4, 22, "unknown backend 'vllm'", hint="installed backends: ")
    assert "transformers" in err.hint


def test_S208_unknown_op(workdir):
    exc = compile_errors(workdir, spec("  - id: a\n    generat: {from: problems}\n"))
    check(exc, "S208", 11, 5, "unknown op 'generat'", hint="did you mean 'generate'?")


def test_S208_unknown_op_lists_installed_ops(workdir):
    exc = compile_errors(workdir, spec("  - id: a\n    summon_data: {from: problems}\n"))
    err = check(exc, "S208", 11, 5, "unknown op 'summon_data'", hint="installed ops: ")
    assert "generate" in err.hint and "erase_prompt" in err.hint


def test_S209_unknown_recipe(workdir):
    exc = compile_errors(workdir, spec("  - id: a\n    use: distill\n    with: {}\n"))
    check(exc, "S209", 11, 10, "unknown recipe 'distill'", hint="installed recipes: ")
    assert "orca.prompt_erasure" in exc.errors[0].hint


def test_S210_invalid_backend_option(workdir):
    text = spec(GEN).replace("{model: smollm2-135m-instruct}", "{model: smollm2-135m-instruct, device: tpu}")
    exc = compile_errors(workdir, text)
    check(exc, "S210", 4, 51, "invalid option `device` for backend 'transformers': 'tpu' is not one of",
          hint="allowed: 'auto', 'cpu', 'cuda'")


def test_S210_backend_rejects_the_model(workdir):
    # `specdsl plan` used to be the first to see this (the backend's identity() looked the model up);
    # the backend's check_options now finds it in `specdsl validate`, at the model's value. Nothing is
    # downloaded either way.
    text = spec(GEN).replace("{model: smollm2-135m-instruct}", "{model: ./no-such-model-folder}")
    for identities in (False, True):
        exc = compile_errors(workdir, text, identities=identities)
        check(exc, "S210", 4, 20, "model 'teacher': no model folder at './no-such-model-folder'", hint="check the path")
        assert exc.codes == ["S210"]  # plan does not report it a second time through identity()
        assert exc.errors[0].key_path == ("models", "teacher", "model")


def with_model(entry: str, steps: str = GEN) -> str:
    """The spec with line 4 holding ``teacher: {entry}``."""
    return spec(steps).replace("{model: smollm2-135m-instruct}", entry)


def test_S210_unknown_model_name_did_you_mean(workdir):
    exc = compile_errors(workdir, with_model("{model: smollm2-135m}"))
    check(exc, "S210", 4, 20, "model 'teacher': unknown model 'smollm2-135m'",
          hint="did you mean 'smollm2-135m-instruct'?")


def test_S210_model_hub_id_is_not_a_local_folder(workdir):
    exc = compile_errors(workdir, with_model("{model: HuggingFaceTB/SmolLM2-135M-Instruct}"))
    check(exc, "S210", 4, 20, "no model folder at 'HuggingFaceTB/SmolLM2-135M-Instruct'",
          hint="this looks like a model hub id; specdsl never downloads from a hub")


def fake_model_folder(folder: Path, *, context: int | None = 2048, template: bool = True) -> Path:
    """Just the small files the transformers backend's check_options reads (no weights)."""
    folder.mkdir()
    config = {"model_type": "llama"} | ({"max_position_embeddings": context} if context else {})
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if template:
        tokenizer_config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_S210_model_folder_without_config_json(workdir):
    (workdir / "weights").mkdir()
    exc = compile_errors(workdir, with_model("{model: ./weights}"))
    check(exc, "S210", 4, 20, "is a folder but not a Hugging Face model folder (no config.json",
          hint="point at the folder that contains config.json")


def test_S210_model_folder_without_chat_template(workdir):
    fake_model_folder(workdir / "base-model", template=False)
    exc = compile_errors(workdir, with_model("{model: ./base-model}"))
    check(exc, "S210", 4, 20, "the tokenizer in", hint="use an instruct/chat model")
    assert "has no chat template" in exc.errors[0].message


def test_S210_max_new_tokens_leaves_no_room_for_a_prompt(workdir):
    exc = compile_errors(workdir, with_model("{model: smollm2-135m-instruct, max_new_tokens: 8192}"))
    check(exc, "S210", 4, 59, "max_new_tokens 8192 leaves no room for a prompt in the 8192-token context",
          hint="lower it well below 8192")
    assert exc.errors[0].key_path == ("models", "teacher", "max_new_tokens")


def test_S210_default_max_new_tokens_too_long_for_a_local_model_points_at_the_entry(workdir):
    # The default (256) is not written in the spec: the error points at the model entry instead.
    fake_model_folder(workdir / "small-model", context=128)
    exc = compile_errors(workdir, with_model("{model: ./small-model}"))
    check(exc, "S210", 4, 12, "max_new_tokens 256 leaves no room for a prompt in the 128-token context")


def test_S210_local_model_folder_is_found_beside_the_spec_from_any_working_directory(workdir, monkeypatch):
    fake_model_folder(workdir / "my-model")
    path = write(workdir, with_model("{model: ./my-model, max_new_tokens: 64}"))
    (workdir / "elsewhere").mkdir()
    monkeypatch.chdir(workdir / "elsewhere")
    api.compile_spec(path, identities=False)  # validate: no error


LITELLM = "{backend: litellm, model: hosted_vllm/qwen, api_base: 'http://10.0.0.5:8000/v1'}"


def test_S210_litellm_api_base_without_a_host(workdir):
    exc = compile_errors(workdir, with_model(LITELLM.replace("10.0.0.5", "")))
    check(exc, "S210", 4, 66, "api_base 'http://:8000/v1' has no host name", hint="e.g. http://10.0.0.5:8000/v1")


def test_S210_litellm_api_base_with_a_bad_port(workdir):
    exc = compile_errors(workdir, with_model(LITELLM.replace(":8000", ":80000")))
    check(exc, "S210", 4, 66, "is not a valid URL: Port out of range")


def test_S210_litellm_api_base_that_already_ends_in_chat_completions(workdir):
    exc = compile_errors(workdir, with_model(LITELLM.replace("/v1'", "/v1/chat/completions'")))
    check(exc, "S210", 4, 66, "api_base ends with /chat/completions, which this backend appends itself",
          hint="give the base URL: api_base: http://10.0.0.5:8000/v1")
    # Through litellm's own client the URL is litellm's business, not this check's.
    write(workdir, with_model(LITELLM.replace("/v1'", "/v1/chat/completions', transport: litellm")))
    api.compile_spec(workdir / "s.yaml", identities=False)


def test_S210_litellm_model_prefix_without_a_model_name(workdir):
    exc = compile_errors(workdir, with_model(LITELLM.replace("hosted_vllm/qwen", "hosted_vllm/")))
    check(exc, "S210", 4, 38, "model 'hosted_vllm/' names no model after 'hosted_vllm/'",
          hint="write hosted_vllm/<the model name the server serves>")


def test_S210_litellm_extra_header_that_no_http_client_sends(workdir):
    entry = LITELLM.replace("}", ", extra_headers: {'X Team': ml, X-Trace: \"a\\nb\"}}")
    exc = compile_errors(workdir, with_model(entry))
    assert exc.codes == ["S210", "S210"]
    check(exc, "S210", 4, 119, "'X Team' is not a valid HTTP header name", hint="no spaces or colons")
    check(exc, "S210", 4, 132, "the value of header 'X-Trace' contains a line break", index=1)
    assert exc.errors[1].key_path == ("models", "teacher", "extra_headers", "X-Trace")


def test_S210_all_problems_of_a_model_entry_at_once(workdir):
    entry = "{backend: litellm, model: ' openai/gpt-4o', api_base: 'http://:1/v1'}"
    exc = compile_errors(workdir, with_model(entry))
    assert [(e.code, e.pos.line, e.pos.col) for e in exc.errors] == [("S210", 4, 38), ("S210", 4, 66)]
    assert "starts or ends with spaces" in exc.errors[0].message


class _EchoBackend:
    """A third-party backend from before check_options existed: identity, price and generate only."""

    name = "echo"
    version = "1"
    options_schema = {"type": "object", "additionalProperties": False,
                      "properties": {"prefix": {"type": "string"}}}

    def identity(self, options):
        if options.get("prefix") == "bad":
            raise ValueError("prefix 'bad' is not allowed")
        return {"model": options["model"], "prefix": options.get("prefix", "")}

    def price(self, options, input_tokens, output_tokens):
        return 0.0

    def generate(self, options, requests, on_result):
        raise AssertionError("not called by the compiler")


class _CheckedEchoBackend(_EchoBackend):
    name = "checked_echo"

    def check_options(self, options):
        from specdsl.contract.hookspecs import OptionProblem

        if options.get("prefix") == "bad":
            return [OptionProblem(("prefix",), "prefix 'bad' is not allowed", "pick another prefix")]
        if options.get("prefix") == "crash":
            raise KeyError("oops")
        return []


def _echo_registry():
    from specdsl.contract.hookspecs import hookimpl
    from specdsl.plugins import build_registry

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(_EchoBackend())
            register(_CheckedEchoBackend())

    return build_registry(extra_plugins=(Plugin(),))


def test_S210_plugin_backends_with_and_without_check_options(workdir, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    registry = _echo_registry()
    # Without check_options: validate passes, plan reports identity()'s error on the entry, as before.
    text = with_model("{backend: echo, model: e, prefix: bad}")
    path = write(workdir, text)
    api.compile_spec(path, identities=False, registry=registry)
    exc = compile_errors(workdir, text, identities=True, registry=registry)
    check(exc, "S210", 4, 12, "model 'teacher': prefix 'bad' is not allowed")
    # With it: validate already reports it, at the option.
    exc = compile_errors(workdir, text.replace("echo", "checked_echo"), registry=registry)
    check(exc, "S210", 4, 54, "model 'teacher': prefix 'bad' is not allowed", hint="pick another prefix")
    for backend in ("echo", "checked_echo"):  # a good entry compiles fully with either
        path.write_text(with_model(f"{{backend: {backend}, model: e, prefix: ok}}"))
        plan = api.compile_spec(path, identities=True, registry=registry)
        assert plan.node("answers").backend == f"{backend} 1"


def test_S210_a_check_options_that_crashes_blames_the_plugin(workdir, monkeypatch):
    monkeypatch.setenv("SPECDSL_PLUGINS", "none")
    exc = compile_errors(workdir, with_model("{backend: checked_echo, model: e, prefix: crash}"),
                         registry=_echo_registry())
    check(exc, "S210", 4, 12, "backend 'checked_echo' failed to check model 'teacher': KeyError('oops')",
          hint="a bug in the plugin that provides it")


def test_S211_recipe_rejects_its_parameters(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: long\n    use: in2.long_context\n"
        "    with: {source: problems, teacher: teacher, student: teacher, min_tokens: 900, max_tokens: 300}\n"))
    check(exc, "S211", 11, 10, "recipe 'in2.long_context': min_tokens (900) must be <= max_tokens (300)")


def test_S212_unknown_training_target(workdir):
    exc = compile_errors(workdir, spec("  - id: sft\n    train: {from: problems, model: teacher, target: tpu}\n"))
    index = exc.codes.index("S212")
    check(exc, "S212", 11, 53, "unknown training target 'tpu'", hint="cpu", index=index)
    assert exc.codes.count("S212") == 1


def test_S212_target_not_installed(workdir):
    base = default_registry()
    without_cuda = Registry(backends=base.backends, targets={k: v for k, v in base.targets.items() if k != "cuda"},
                            ops=base.ops, recipes=base.recipes, probes=base.probes, executors=base.executors, sources=base.sources)
    text = spec("  - id: fmt\n    format: {from: problems, user: '{{ row.question }}', assistant: '{{ row.answer }}'}\n"
                "  - id: sft\n    train: {from: fmt, model: teacher, target: cuda}\n")
    exc = compile_errors(workdir, text, registry=without_cuda)
    err = check(exc, "S212", 13, 48, "training target 'cuda'")
    assert "cpu" in err.hint and "cuda" not in err.hint
    assert exc.codes == ["S212"]


def test_S213_unknown_probe(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: score\n    evaluate: {models: [teacher], on: problems, probes: [{probe: acuracy}]}\n"))
    check(exc, "S213", 11, 66, "unknown probe 'acuracy'", hint="did you mean 'accuracy'?")


# --------------------------------------------------------------------------------------------------
# Templates (S3xx)
# --------------------------------------------------------------------------------------------------


def test_S301_template_syntax_error(workdir):
    exc = compile_errors(workdir, spec(GEN.replace("'{{ row.question }}'", "'{{ row.question '")))
    check(exc, "S301", 11, 54, "unexpected end of template")


@pytest.mark.parametrize("template, message", [
    ("{{ row.question | uper }}", "unknown filter 'uper' (did you mean 'upper'?)"),
    ("{% if row.question is evn %}x{% endif %}", "unknown test 'evn' (did you mean 'even'?)"),
])
def test_S301_unknown_filter_or_test_is_caught_before_running(workdir, template, message):
    exc = compile_errors(workdir, spec(f'  - id: a\n    map: {{from: problems, columns: {{x: "{template}"}}}}\n'))
    check(exc, "S301", 11, 40, message)


def test_S301_absurdly_nested_template_is_an_error_not_a_crash(workdir):
    template = "{{ " + "(" * 3000 + "row.question" + ")" * 3000 + " }}"
    start = time.process_time()  # CPU time: the work done, not how busy the machine is
    exc = compile_errors(workdir, spec(f'  - id: a\n    map: {{from: problems, columns: {{x: "{template}"}}}}\n'))
    assert time.process_time() - start < 1
    check(exc, "S301", 11, 40, "template nests too deeply to check")


def test_S302_template_column_missing_at_this_step_did_you_mean(workdir):
    exc = compile_errors(workdir, spec(GEN + "  - id: shout\n    map: {from: answers, columns: {loud: '{{ row.respons | upper }}'}}\n"))
    err = check(exc, "S302", 13, 46, "template reads column 'row.respons', which does not exist at this step",
                hint="did you mean 'response'?")
    assert "columns here: id, category, question, answer, response" in err.hint


def test_S302_columns_flow_through_the_dag(workdir):
    # `response` exists after `answers`, not before it: a map reading the source cannot see it.
    exc = compile_errors(workdir, spec(GEN + "  - id: early\n    map: {from: problems, columns: {x: '{{ row.response }}'}}\n"))
    check(exc, "S302", 13, 44, "'row.response', which does not exist", hint="columns here: id, category")


def test_S302_in_a_block_scalar_points_at_the_line_of_the_name(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: a\n    generate:\n      from: problems\n      model: teacher\n      user: |\n"
        "        Question: {{ row.question }}\n        Category: {{ row.categroy }}\n"))
    check(exc, "S302", 16, 22, "template reads column 'row.categroy'", hint="did you mean 'category'?")


def test_S303_unknown_template_variable(workdir):
    exc = compile_errors(workdir, spec(GEN.replace("{{ row.question }}", "{{ greting }} {{ row.question }}")))
    check(exc, "S303", 11, 58, "template uses unknown variable 'greting' (did you mean 'greeting'?)",
          hint="templates see `row`, `vars`")


@pytest.mark.parametrize("template, shown, col", [
    ("{{ row.__class__ }}", "'__class__'", 48),
    ("{{ ''.__class__.__mro__ }}", "'__mro__', '__class__'", 57),
    ("{{ row | attr('__dict__') }}", "'__dict__'", 56),
    ("{% include 'x.txt' %}", "'{% include %}'", 40),  # the template's start
])
def test_S304_sandbox_unsafe_expressions(workdir, template, shown, col):
    exc = compile_errors(workdir, spec(f'  - id: a\n    map: {{from: problems, columns: {{x: "{template}"}}}}\n'))
    check(exc, "S304", 11, col, f"template uses {shown}, which the sandbox forbids")
    assert exc.codes == ["S304"]  # `row.__class__` is not also reported as a missing column


# --------------------------------------------------------------------------------------------------
# Op rules, secrets, sources (S4xx)
# --------------------------------------------------------------------------------------------------


def test_S401_interleave_min_tokens_above_max_tokens(workdir):
    exc = compile_errors(workdir, spec(
        "  - id: segs\n    segment: {from: problems, model: teacher, text: question}\n"
        "  - id: long\n"
        "    interleave: {from: segs, pool: segs, model: teacher, key: segment, question: question,\n"
        "                 answer: answer, min_tokens: 900, max_tokens: 300}\n"))
    check(exc, "S401", 14, 46, "min_tokens (900) must be <= max_tokens (300)")
    assert exc.codes == ["S401"]


def test_S401_step_with_two_ops(workdir):
    exc = compile_errors(workdir, spec(GEN + "    map: {from: problems, columns: {x: '1'}}\n"))
    check(exc, "S401", 12, 5, "step 'answers' names several ops (generate, map)", hint="one step per op")


def test_S402_train_input_has_neither_messages_nor_prompt_completion(workdir):
    exc = compile_errors(workdir, spec("  - id: sft\n    train: {from: problems, model: teacher}\n"))
    check(exc, "S402", 11, 19, "its input has neither", hint="add a `format` step first")


def test_S403_column_missing_for_an_op(workdir):
    exc = compile_errors(workdir, spec(GEN + "  - id: kept\n    filter: {from: answers, match: {field: response, gold: gold}}\n"))
    check(exc, "S403", 13, 60, "column 'gold' does not exist at this step", hint="columns here: ")


SECRET = "sk-live-0123456789abcdefABCDEF"


def test_S404_inline_secret_is_reported_and_never_shown(workdir):
    text = spec(GEN).replace("{model: smollm2-135m-instruct}", "{model: smollm2-135m-instruct, api_key: " + SECRET + "}")
    exc = compile_errors(workdir, text)
    err = next(e for e in exc.errors if e.code == "S404")
    assert (err.pos.line, err.pos.col) == (4, 52)
    assert "write it as ${env:NAME}" in err.message and "${env:" in err.hint
    printed = exc.render()
    assert SECRET not in printed and "sk-live" not in printed
    assert "api_key: ***" in printed  # the line is shown with the secret masked, the caret under it
    check(exc, "S404", 4, 52, "'api_key' holds an inline secret", index=exc.errors.index(err))
    # The transformers backend has no api_key option: that is reported too, also without the secret.
    assert "S104" in exc.codes


def test_S404_secret_shaped_value_anywhere(workdir):
    exc = compile_errors(workdir, spec(GEN).replace("greeting: hello", "greeting: " + SECRET))
    check(exc, "S404", 8, 13, "'greeting' holds an inline secret")
    assert SECRET not in exc.render()


def test_S404_credentials_in_a_header_or_a_url(workdir):
    """An Authorization header or a password inside api_base would reach plans and manifests with the options."""
    header = LITELLM.replace("}", ", extra_headers: {Authorization: 'Bearer abc123def456'}}")
    exc = compile_errors(workdir, spec(GEN).replace("{model: smollm2-135m-instruct}", header))
    check(exc, "S404", 4, 124, "'Authorization' holds an inline secret")
    assert "abc123def456" not in exc.render()

    url = LITELLM.replace("http://10.0.0.5", "http://bob:hunter2pw@10.0.0.5")
    exc = compile_errors(workdir, spec(GEN).replace("{model: smollm2-135m-instruct}", url))
    check(exc, "S404", 4, 66, "'api_base' holds an inline secret")
    assert "hunter2pw" not in exc.render()


def test_S404_references_inside_headers_and_urls_are_fine(workdir, monkeypatch):
    from specdsl import secrets

    header = LITELLM.replace("}", ", extra_headers: {Authorization: '${env:AUTH_HEADER}', X-Team: research}}")
    url = header.replace("http://10.0.0.5", "http://bob:${env:PW}@10.0.0.5")
    plan = api.compile_spec(write(workdir, spec(GEN).replace("{model: smollm2-135m-instruct}", url)),
                            identities=False)
    assert plan.node("answers").op == "generate"
    # A reference inside a header map is resolved when the backend runs, and redacted from its errors.
    monkeypatch.setenv("AUTH_HEADER", "Bearer abc123def456")
    resolved = secrets.resolve({"model": "m", "extra_headers": {"Authorization": "${env:AUTH_HEADER}",
                                                                "X-Team": "research"}}, model="teacher")
    assert resolved["extra_headers"] == {"Authorization": "Bearer abc123def456", "X-Team": "research"}
    assert resolved["_extra_headers.Authorization_env"] == "AUTH_HEADER"
    assert secrets.redact("401: bad credentials Bearer abc123def456", resolved) == \
        "401: bad credentials ${env:AUTH_HEADER}"
    monkeypatch.delenv("AUTH_HEADER")
    with pytest.raises(RunError, match="AUTH_HEADER is not set .needed for `extra_headers.Authorization`"):
        secrets.resolve({"extra_headers": {"Authorization": "${env:AUTH_HEADER}"}}, model="teacher")


def test_S404_not_raised_for_ordinary_text(workdir):
    text = spec(GEN).replace("greeting: hello", "greeting: sk-learn-is-a-python-library\n  eos_token: '<|im_end|>'")
    assert api.compile_spec(write(workdir, text), identities=False).has("answers")


def test_S404_env_references_are_fine(workdir):
    text = spec(GEN).replace("sources:", "meta: {api_key: '${env:MY_KEY}', token: '${env:HF_TOKEN}'}\nsources:")
    plan = api.compile_spec(write(workdir, text), identities=False)
    assert plan.node("answers").op == "generate"


def test_S405_missing_source_file(workdir):
    exc = compile_errors(workdir, spec(GEN).replace("problems.jsonl", "nowhere.jsonl"))
    check(exc, "S405", 6, 20, "source 'problems': file 'nowhere.jsonl' does not exist", hint="declare `columns:`")
    assert exc.codes == ["S405"]  # steps reading it are not blamed for its unknown columns


def test_S405_unreadable_source(workdir):
    (workdir / "bad.jsonl").write_text("{not json\n")
    exc = compile_errors(workdir, spec(GEN).replace("problems.jsonl", "bad.jsonl"))
    check(exc, "S405", 6, 20, "source 'problems': cannot read 'bad.jsonl': bad.jsonl:1: not valid JSON")


def write(workdir: Path, text: str) -> Path:
    path = workdir / "s.yaml"
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------
# All errors together; coverage of the table
# --------------------------------------------------------------------------------------------------


def test_three_different_errors_in_one_run(workdir):
    text = spec(
        "  - id: answers\n"
        "    generate: {from: problems, model: teachr, user: '{{ row.question }}'}\n"       # S201
        "  - id: shout\n"
        "    map: {from: answers, columns: {x: '{{ row.respons }}', y: '{{ nope }}'}}\n")  # S302, S303
    exc = compile_errors(workdir, text)
    assert exc.codes == ["S201", "S302", "S303"]
    assert [(e.pos.line, e.pos.col) for e in exc.errors] == [(11, 39), (13, 43), (13, 67)]
    assert exc.render().endswith("3 errors")


def test_schema_errors_are_all_reported_in_file_order(workdir):
    text = spec(
        "  - id: a\n"
        "    generate: {from: problems, model: teacher, user: hi, max_tokens: 0, temprature: 1}\n"
        "  - id: b\n"
        "    filter: {from: a}\n"
        "    colour: red\n").replace("{model: smollm2-135m-instruct}", "{model: smollm2-135m-instruct, max_new_token: 1}")
    exc = compile_errors(workdir, text)
    assert exc.codes == ["S104", "S103", "S104", "S208"]
    lines = [e.pos.line for e in exc.errors]
    assert lines == sorted(lines)


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_has_a_hint_even_when_its_producer_gives_none(code):
    """Every error says what to do: ``check`` above asserts it for each error the tests produce, and an
    error whose producer gives no hint (a third-party op's check) gets its code's."""
    from specdsl.errors import DEFAULT_HINTS, ErrorSink

    assert set(DEFAULT_HINTS) == set(CODES)
    sink = ErrorSink()
    sink.add(code, "something is wrong")
    assert sink.errors[0].hint == DEFAULT_HINTS[code] and len(DEFAULT_HINTS[code]) > 20
    assert f"  hint: {DEFAULT_HINTS[code]}" in sink.errors[0].render()
    sink.add(code, "something is wrong", hint="do this")
    assert sink.errors[1].hint == "do this"


def test_every_code_has_a_test():
    names = [name for name in globals() if name.startswith("test_S")]
    missing = sorted(code for code in CODES if not any(n.startswith(f"test_{code}_") for n in names))
    assert not missing, f"codes with no test: {missing}"
    unknown = sorted({n[5:9] for n in names} - set(CODES))
    assert not unknown, f"tests for codes that do not exist: {unknown}"


def test_every_code_was_produced():
    """Runs last in this module: each code in CODES came out of the compiler in some test above."""
    if len(EXERCISED) < 10:
        pytest.skip("run the whole module to check this")
    assert sorted(set(CODES) - EXERCISED) == []
