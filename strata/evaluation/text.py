"""A built-in English evaluation text, built offline from the Python standard library.

Source: ``pydoc_data.topics``, the plain-text help topics that CPython ships with ``help()``. They
are chapters of the Python Language Reference and Library Reference (execution model, data model,
expressions, statements, built-in types), written as English prose by the Python documentation
authors. License: the Python Software Foundation License (the documentation is distributed under
the PSF License Agreement with CPython itself, https://docs.python.org/3/license.html).

Why this source: perplexity needs natural English that every installation has without a download.
The topics are prose paragraphs interleaved with grammar rules and code examples; the code is
dropped paragraph by paragraph (see ``_is_prose``) so what remains reads as English, not Python.
The result is deterministic for one Python version (the topics are a frozen module), but it
changes between Python versions, so compare perplexities measured on the same Python.
"""

from __future__ import annotations

import re

DEFAULT_MAX_CHARS = 50_000

# Characters that are common in code and grammar and rare in prose.
_CODE_CHARS = set("=[]{}<>\\|_#@`~^$")
_HEADING_RULE = re.compile(r"^\s*([*=\-^~])\1{2,}\s*$")
_EMPHASIS = re.compile(r"\*{1,2}([^*\s][^*]*?)\*{1,2}")   # reST *emphasis* / **strong** markers
_BULLET = re.compile(r"^\s*[*\-] ")
_WORD_EDGES = ".,;:!?()\"'“”‘’–-"


def english_eval_text(max_chars: int = DEFAULT_MAX_CHARS) -> str:
    """Prose paragraphs of the stdlib's help topics, in topic-name order, joined by blank lines,
    at most ``max_chars`` characters (whole paragraphs only)."""
    if not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    from pydoc_data.topics import topics
    kept: list[str] = []
    size = 0
    for name in sorted(topics):
        for paragraph in _prose_paragraphs(topics[name]):
            added = len(paragraph) + (2 if kept else 0)
            if size + added > max_chars:
                return "\n\n".join(kept)
            kept.append(paragraph)
            size += added
    return "\n\n".join(kept)


def _prose_paragraphs(topic: str):
    for block in re.split(r"\n\s*\n", topic):
        lines = block.splitlines()
        if not lines or any(_HEADING_RULE.match(line) for line in lines):
            continue   # a section title and its underline
        # Re-flow the hard-wrapped lines into one; a list item keeps its text, not its bullet.
        text = " ".join(" ".join(lines).split())
        text = _EMPHASIS.sub(r"\1", _BULLET.sub("", text))
        if _is_prose(text, lines):
            yield text


def _is_prose(text: str, lines: list[str]) -> bool:
    """A paragraph of sentences: enough words, nearly all of them plain words, almost no code
    punctuation, ending with a full stop. Grammar rules, examples and tables fail one of these."""
    if any(line.lstrip().startswith((">>>", "...")) for line in lines) or "::=" in text:
        return False
    words = text.split()
    # A lead-in ending in ':' introduces the example that was dropped, so it goes too.
    if len(words) < 8 or not (text[-1] in ".?!" or text.endswith(".)")):
        return False
    plain = sum(w.strip(_WORD_EDGES).replace("’", "").replace("'", "").isalpha() for w in words)
    code = sum(c in _CODE_CHARS for c in text)
    return plain >= 0.8 * len(words) and code <= 0.01 * len(text)
