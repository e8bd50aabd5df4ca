"""The ``key=value`` text of the activity lines: what gets quoted, and how."""

from __future__ import annotations

import logging

import pytest

from workers.activity import _text, log_fields


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, "0"),
        (12345, "12345"),
        (-3, "-3"),
        (True, "True"),
        (None, "None"),
        (0.003, "0.003"),
        ("PACSRX", "PACSRX"),
        ("127.0.0.1:41344", "127.0.0.1:41344"),
        ("", '""'),
        ("MY AE", '"MY AE"'),
        ("a\tb", '"a\tb"'),
        ("a\u2003b", '"a\u2003b"'),  # an em space is white space too
        ("a\x1cb", '"a\x1cb"'),  # str.isspace() says the file separator is as well
        ("k=v", '"k=v"'),
        ("it's", '"it\'s"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", "back\\slash"),
        ("back\\ slash", '"back\\\\ slash"'),
    ],
)
def test_values_are_quoted_only_when_they_would_be_ambiguous(value: object, expected: str) -> None:
    assert _text(value) == expected


def test_every_white_space_character_is_quoted() -> None:
    for code in range(0x110000):
        char = chr(code)
        needs = char.isspace() or char in "\"'="
        assert _text("x" + char + "y").startswith('"') is needs, hex(code)


def test_one_line_with_every_field(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.activity")
    with caplog.at_level(logging.INFO, logger="tests.activity"):
        log_fields(
            logger,
            logging.INFO,
            "association",
            {"peer": "127.0.0.1:1", "calling_ae": "A B", "instances": 3},
        )
    assert caplog.messages == ['association peer=127.0.0.1:1 calling_ae="A B" instances=3']
    assert caplog.records[0].fields == {  # type: ignore[attr-defined]
        "event": "association",
        "peer": "127.0.0.1:1",
        "calling_ae": "A B",
        "instances": 3,
    }
