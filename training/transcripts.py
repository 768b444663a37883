"""What the English Asterisk prompts say, normalised for word error rates.

    prompts = Transcripts.load()                            # None when the file is missing
    prompts.reference("en_US_f_Allison/agent-newlocation")  # "please enter a new extension ..."
    normalise("Press 1, then 22.")                          # "press one then twenty two"

The transcripts come with the Debian package ``asterisk-core-sounds-en`` (`TRANSCRIPTS`), one
prompt a line: ``agent-newlocation: Please enter a new extension, followed by pound.``, prompts
in subfolders by their path (``digits/5: five``). An utterance id of an Asterisk dataset
(`training.prepare`) is the voice folder and that path, ``en_US_f_Allison/digits/5``; only
voice folders of language ``en`` have transcripts here.

A recogniser writes words, so references and hypotheses are compared after `normalise`: lower
case, annotations in brackets or parentheses dropped (``[ascending tones]``, ``(10 seconds of
silence)``: a prompt left with no words has no reference), numbers written out as words (``22``
-> ``twenty two``, ``1st`` -> ``first``), punctuation and hyphens turned into spaces, and only
apostrophes inside words kept (``you'd``). Standard library only.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
PACKAGE = "asterisk-core-sounds-en"
# Voice folders are LANG_REGION_GENDER_NAME, as in `training.prepare` (which imports torch).
VOICE_FOLDER = re.compile(r"^(?P<lang>[a-z]{2})_[A-Z]{2}_[fm]_\w+$")

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL = {
    "one": "first",
    "two": "second",
    "three": "third",
    "five": "fifth",
    "eight": "eighth",
    "nine": "ninth",
    "twelve": "twelfth",
}
_ANNOTATION = re.compile(r"\[[^\]]*\]|\([^)]*\)")
_NUMBER = re.compile(r"\d+(?:,\d{3})*(?:(?:st|nd|rd|th)(?![a-z]))?")


def number_words(n: int) -> str:
    """``n`` (0 <= n < 10**12) in words, American style without "and": 2024 -> "two thousand
    twenty four"."""
    if not 0 <= n < 10**12:
        raise ValueError(f"{n} is outside [0, 10**12)")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    for size, name in _SCALES:
        if n >= size:
            rest = n % size
            head = f"{number_words(n // size)} {name}"
            return head + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError("unreachable")


def ordinal_words(n: int) -> str:
    """``n`` as an ordinal in words: 1 -> "first", 21 -> "twenty first", 40 -> "fortieth"."""
    *head, last = number_words(n).split()
    if last in _ORDINAL:
        last = _ORDINAL[last]
    elif last.endswith("y"):
        last = last[:-1] + "ieth"
    else:
        last += "th"
    return " ".join([*head, last])


def _spell(match: re.Match) -> str:
    token = match.group(0)
    digits = token.rstrip("stndrh").replace(",", "")
    ordinal = len(digits) < len(token.replace(",", ""))
    if len(digits) > 12 or (len(digits) > 1 and digits.startswith("0")):  # say it digit by digit
        return " " + " ".join(_ONES[int(d)] for d in digits) + " "
    words = ordinal_words(int(digits)) if ordinal else number_words(int(digits))
    return f" {words} "


def normalise(text: str) -> str:
    """Words of ``text`` as a recogniser writes them (see the module doc), space-separated."""
    text = _ANNOTATION.sub(" ", text).lower()
    text = _NUMBER.sub(_spell, text)
    text = re.sub(r"[^a-z']+", " ", text)
    words = (w.strip("'") for w in text.split())
    return " ".join(w for w in words if w)


def parse(lines) -> dict[str, str]:
    """``{prompt path: text}`` from the transcript file's lines (``;`` starts a comment)."""
    prompts = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith(";") or ":" not in line:
            continue
        key, text = line.split(":", 1)
        prompts[key.strip()] = text.strip()
    return prompts


class Transcripts:
    """The English prompts' texts, looked up by utterance id."""

    def __init__(self, prompts: dict[str, str]):
        self.prompts = dict(prompts)

    @classmethod
    def load(cls, path: str | Path = TRANSCRIPTS) -> Transcripts | None:
        """The transcripts in ``path`` (gzip or plain text), or None where it does not exist
        (install the Debian package `PACKAGE`)."""
        path = Path(path)
        if not path.is_file():
            return None
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            return cls(parse(f))

    def text(self, utterance_id: str) -> str | None:
        """The prompt's text as written, for an English Asterisk utterance id; else None."""
        folder, _, prompt = utterance_id.partition("/")
        m = VOICE_FOLDER.match(folder)
        if m is None or m["lang"] != "en" or not prompt:
            return None
        return self.prompts.get(prompt)

    def reference(self, utterance_id: str) -> str | None:
        """The normalised words of the utterance (`normalise`), or None where it has no
        transcript or the transcript has no words."""
        text = self.text(utterance_id)
        words = normalise(text) if text is not None else ""
        return words or None

    def __len__(self) -> int:
        return len(self.prompts)
