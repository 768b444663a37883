"""Untrusted text in messages: quoted values and file names come out printable, valid UTF-8
and bounded, whatever they held."""

import os

import pytest

from vqwavenet.safe_text import MAX_QUOTED, printable, quote, show_path


@pytest.mark.parametrize(
    "value, shown",
    [
        ("p225", "'p225'"),
        ("Zoë", "'Zoë'"),
        ("\ud800", "'\\ud800'"),
        ("\x1b[2J\n", "'\\x1b[2J\\n'"),
        ("a\u202eb", "'a\\u202eb'"),  # right-to-left override: invisible, so escaped
        (None, "None"),
        (16000.0, "16000.0"),
        (True, "True"),
        (-(10**4000), "a negative integer of about 4001 digits"),
        ([[[[[[1]]]]]], "[[[[...]]]]"),
    ],
)
def test_quote_escapes_what_is_not_printable(value, shown):
    assert quote(value) == shown


@pytest.mark.parametrize(
    "value, note",
    [("x" * 50000, "(50000 characters)"), (["y" * 200] * 300, "(300 items)")],
)
def test_quote_cuts_long_values_and_says_how_long_they_were(value, note):
    text = quote(value)
    assert text.endswith(note) and len(text) <= MAX_QUOTED + len(note) + 1


@pytest.mark.skipif(os.name == "nt", reason="POSIX file names are bytes; Windows' are not")
def test_show_path_shows_undecodable_bytes_and_control_characters_escaped():
    name = os.fsdecode(b"dir/caf\xe9\n.wav")
    assert show_path(name) == "dir/caf\\xe9\\n.wav"
    assert show_path(b"x\xff.vqwc") == "x\\xff.vqwc"
    assert show_path("plain/Zoë.wav") == "plain/Zoë.wav"
    assert printable("ok \ud800") == "ok \\ud800"
