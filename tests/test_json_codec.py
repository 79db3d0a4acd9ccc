"""fleet.json_codec writes what json.dumps means, whatever orjson would do differently."""

from __future__ import annotations

import json

import pytest

from fleet import json_codec

VALUES = [
    {"order_id": "4429", "amount_cents": 12999, "refunds": [], "note": "crème brûlée"},
    [1.5, -0.0, 1e300, None, True, "tab\tquote\"backslash\\"],
    {"big": 2**70, "negative big": -(2**65)},  # past 64 bits: orjson refuses, json is exact
    {1: "int key", 2.5: "float key"},  # json writes non-string keys as strings
    "lone \ud800 surrogate",  # orjson refuses; json escapes it
    {"nested": {"deep": [[[{"x": "y"}]]]}},
]


@pytest.mark.parametrize("value", VALUES)
def test_dumps_means_what_json_dumps_means(value) -> None:
    assert json.loads(json_codec.dumps(value)) == json.loads(json.dumps(value))


@pytest.mark.parametrize("value", [v for v in VALUES if "surrogate" not in str(v)])
def test_dumps_bytes_is_compact_utf8_json(value) -> None:
    assert json_codec.dumps_bytes(value) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False).encode()


def test_what_neither_can_write_still_raises() -> None:
    with pytest.raises(TypeError):
        json_codec.dumps({"a set": {1, 2}})


@pytest.mark.parametrize(
    "text", ["{}", "{ }", '{"a": [1, 2]}', "[]", "12345678901234567890123", '"x"']
)
def test_loads_means_what_json_loads_means(text) -> None:
    assert json_codec.loads(text) == json.loads(text)


def test_an_empty_object_is_a_new_dict_each_time() -> None:
    first = json_codec.loads("{}")
    first["changed"] = True  # a handler may fill its message's variables in place
    assert json_codec.loads("{}") == {}
