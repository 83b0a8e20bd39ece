"""Chat messages as JSON text, written by hand where ``json.dumps`` is slow to build it.

A run writes each request's messages as JSON three times: in its key (sorted keys, compact separators),
in the request body and in the stored prompt column (json's default separators). For messages that are
dicts of str to str, every message a step renders, the text is joined here from json's own string
encoder, at a third to a half of json's cost; any other value goes through json itself. Tests hold each
function to the json.dumps call it stands for, byte for byte.
"""

from __future__ import annotations

import json
from json.encoder import encode_basestring as _string  # the string encoder json uses with ensure_ascii=False
from typing import Any, Mapping, Sequence

_DUMPS = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(value, ensure_ascii=False), made once
# json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")), made once (json.dumps builds an
# encoder per call when given options): the text a request key hashes.
key_json = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode


def messages_json(messages: Sequence[Mapping[str, Any]]) -> str:
    """``json.dumps([dict(m) for m in messages], ensure_ascii=False)``: a request body's messages."""
    text = _plain_messages(messages, sort_keys=False, item_sep=", ", key_sep=": ")
    if text is not None:
        return text
    try:
        return _DUMPS(list(messages))  # a tuple or list encodes as a list, without a copy of each message
    except TypeError:  # another Mapping type: as plain dicts
        return _DUMPS([dict(m) for m in messages])


def messages_key_json(messages: Sequence[Mapping[str, Any]]) -> str:
    """``json.dumps(list(messages), sort_keys=True, ensure_ascii=False, separators=(",", ":"))``: the
    messages' part of a request key."""
    text = _plain_messages(messages, sort_keys=True, item_sep=",", key_sep=":")
    return text if text is not None else key_json(list(messages))


def json_text(value: Any) -> str:
    """``json.dumps(value, ensure_ascii=False)``: a value of a JSON-text column of the store."""
    if type(value) is list:
        text = _plain_messages(value, sort_keys=False, item_sep=", ", key_sep=": ")
        if text is not None:
            return text
    return _DUMPS(value)


def _plain_messages(messages: Sequence[Any], *, sort_keys: bool, item_sep: str, key_sep: str) -> str | None:
    """The JSON list of ``messages`` when each is a dict of str to str, else None."""
    parts = []
    for message in messages:
        if type(message) is not dict:
            return None
        for k, v in message.items():
            if type(k) is not str or type(v) is not str:
                return None
        items = sorted(message.items()) if sort_keys else message.items()  # keys are unique: values never compared
        parts.append("{" + item_sep.join([_string(k) + key_sep + _string(v) for k, v in items]) + "}")
    return "[" + item_sep.join(parts) + "]"
