"""Prompt erasure (Orca 2, Mitra et al. 2023, arXiv 2311.11045).

The teacher answers each task under a *detailed*, task-specific system instruction that elicits the
right strategy (step by step, recall then generate, explain then answer, direct answer). The student is
trained on the same user prompt and the same teacher answer, but with that instruction *erased*:
replaced by a generic system message that says nothing about how to solve the task. The student must
learn to pick the strategy from the task itself. Loss goes on the teacher's answer only (the default of
:func:`specdsl.designs.masking.render_chat`).

Pure row-level functions; rows are plain dicts.
"""

from __future__ import annotations

from typing import Any, Mapping

# The generic system message used with Orca 2 (paper, section 4). A *default* only: specs override it
# with ``generic_system``; nothing in specdsl depends on its wording.
ORCA2_GENERIC_SYSTEM = (
    "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. You carefully "
    "follow instructions. You are helpful and harmless and you follow ethical guidelines and promote "
    "positive behavior."
)
DEFAULT_GENERIC_SYSTEM = ORCA2_GENERIC_SYSTEM


class UnknownStrategyError(KeyError):
    """A row's key has no detailed instruction in the strategy map (and no default was given)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message, quotes and all
        return str(self.args[0]) if self.args else ""


class ErasureLeakError(ValueError):
    """The detailed instruction appears verbatim in what the student is trained on."""


def strategy_for(row: Mapping[str, Any], strategies: Mapping[str, str], key_field: str,
                 default: str | None = None) -> str:
    """The detailed system instruction for ``row``: ``strategies[row[key_field]]``.

    ``default`` is returned for keys the map does not know; without it, an unknown key raises
    :class:`UnknownStrategyError` listing the known keys (a typo in a category name is the usual cause).
    """
    if key_field not in row:
        raise UnknownStrategyError(
            f"row has no field {key_field!r} to choose a strategy by; its fields: {', '.join(sorted(row))}")
    key = row[key_field]
    if key in strategies:
        return strategies[key]
    if default is not None:
        return default
    known = ", ".join(repr(k) for k in sorted(strategies, key=str)) or "(none)"
    raise UnknownStrategyError(
        f"no strategy for {key_field}={key!r}; known keys: {known} (add it to the map or give a default)")


def teacher_messages(row: Mapping[str, Any], *, system: str, user_field: str) -> list[dict[str, str]]:
    """What the teacher is asked: the detailed instruction as system message, then the user prompt."""
    return [{"role": "system", "content": system}, {"role": "user", "content": str(row[user_field])}]


def erase_prompt(
    row: Mapping[str, Any],
    *,
    user_field: str,
    answer_field: str,
    system_field: str | None = None,
    generic_system: str | None = DEFAULT_GENERIC_SYSTEM,
    check_leak: bool = True,
) -> list[dict[str, str]]:
    """The student's conversation for ``row``: generic system, the same user prompt, the teacher answer.

    ``generic_system`` replaces the detailed instruction; ``None`` or ``""`` writes no system message
    at all (the chat template may then insert its own default, as SmolLM2's does). ``system_field``
    names the column holding the detailed instruction the teacher saw; when given and ``check_leak`` is
    true, an instruction that reappears verbatim in the user prompt, the answer or the generic message
    raises :class:`ErasureLeakError`, because the student would then see what was meant to be erased.
    """
    user = row[user_field]
    answer = row[answer_field]
    if user is None or answer is None:
        raise ValueError(f"row has no {user_field if user is None else answer_field!r} to train on")
    user, answer = str(user), str(answer)
    if check_leak and system_field is not None:
        detailed = str(row.get(system_field) or "").strip()
        if detailed:
            for where, text in (("user prompt", user), ("answer", answer), ("generic system", generic_system or "")):
                if detailed in text:
                    raise ErasureLeakError(
                        f"the detailed instruction in {system_field!r} appears verbatim in the {where}; "
                        f"erasing the system message would not hide it")
    messages: list[dict[str, str]] = []
    if generic_system:
        messages.append({"role": "system", "content": generic_system})
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": answer})
    return messages


def erase_row(
    row: Mapping[str, Any],
    *,
    user_field: str,
    answer_field: str,
    system_field: str | None = None,
    generic_system: str | None = DEFAULT_GENERIC_SYSTEM,
    into: str = "messages",
    drop_system_field: bool = True,
    check_leak: bool = True,
) -> dict[str, Any]:
    """A copy of ``row`` with the erased conversation in ``into``.

    The detailed-instruction column is dropped by default so it cannot reach a training input through a
    later step that renders every column.
    """
    messages = erase_prompt(row, user_field=user_field, answer_field=answer_field, system_field=system_field,
                            generic_system=generic_system, check_leak=check_leak)
    out = {key: value for key, value in row.items()
           if not (drop_system_field and system_field is not None and key == system_field)}
    out[into] = messages
    return out
