"""Text from outside (a spec, a file name, an argument) made safe for where it goes.

Every place dnc echoes or emits such text calls one of these; none of them trusts
its input. Kept free of heavy imports: the CLI's error path uses it.
"""

from __future__ import annotations

import html
import re

# Characters that change how a terminal, log or editor shows what follows them:
# C0/C1 controls (ESC starts ANSI and OSC sequences), line and paragraph
# separators, and the bidirectional overrides and isolates ("Trojan Source").
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029" + _BIDI + "]")


def _escape_char(match: re.Match) -> str:
    ch = match.group(0)
    code = ord(ch)
    if ch == "\n":
        return "\\n"
    if ch == "\r":
        return "\\r"
    if ch == "\t":
        return "\\t"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def visible(text: str) -> str:
    """`text` on one line with every control, separator and bidi character shown escaped, as `repr` would.

    Backslashes are doubled so an escape that was in the input cannot pass for one made here.
    """
    text = str(text).replace("\\", "\\\\")
    return _UNSAFE.sub(_escape_char, text)


ECHO_WORD = 200  # the most characters of one word (a run without spaces) a printed line shows
ECHO_LINE = 1_000  # the most characters of one printed line


def echoed(line: str) -> str:
    """A line dnc prints (`visible`), with outside text cut: each word at ECHO_WORD characters, the line at ECHO_LINE.

    A pass name, path or value of 100,000 characters must not flood a terminal or a CI log;
    a long word keeps its start and end, which say what it was.
    """
    shown = re.sub(rf"\S{{{ECHO_WORD + 1},}}", _cut_word, visible(line))
    if len(shown) <= ECHO_LINE:
        return shown
    return f"{shown[: ECHO_LINE - 40]}… ({len(shown) - ECHO_LINE + 40:,} more characters)"


def _cut_word(match: re.Match) -> str:
    word, half = match.group(0), ECHO_WORD // 2
    return f"{word[:half]}…({len(word) - 2 * half:,} characters cut)…{word[-half:]}"


def is_plain(text: str) -> bool:
    """True when `visible` would leave `text` unchanged."""
    return "\\" not in text and not _UNSAFE.search(text)


def quoted(text: str, limit: int = 80) -> str:
    """`'text'` for a one-line message, made visible and cut to `limit` characters."""
    shown = visible(text)
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return f"'{shown}'"


def comment_safe(text: str) -> str:
    """Text for a `#` comment in generated Python or an ONNX string: printable ASCII only, everything else escaped.

    ASCII keeps PEP 263 encoding cookies and homoglyphs out, and file names that are not
    UTF-8 (undecodable bytes arrive as surrogates) escaped; `visible` keeps line breaks out.
    """
    shown = visible(text)
    return shown.encode("ascii", "backslashreplace").decode("ascii")


# Markdown still reads emphasis, code spans and links between inline HTML tags: entities are inert
_MARKDOWN_ENTITIES = {ord(ch): f"&#{ord(ch)};" for ch in "`*_[]~|\\"}


def markdown_code(text: str) -> str:
    """Inline code for Markdown (a pull-request comment): HTML-escaped inside <code>, Markdown punctuation as entities.

    A backtick span cannot hold every string safely (backticks, pipes, HTML in some
    renderers); `<code>` with entities can.
    """
    return "<code>" + html.escape(visible(text), quote=True).translate(_MARKDOWN_ENTITIES) + "</code>"


def markdown_text(text: str) -> str:
    """Plain Markdown text, one line: HTML escaped, and the punctuation that starts emphasis, code or links."""
    return re.sub(r"([\\`*_\[\]|~])", r"\\\1", html.escape(visible(text), quote=False))
