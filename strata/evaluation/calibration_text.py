"""A built-in English calibration text for calibrated quantization (GPTQ), disjoint from the
evaluation text.

Source: the docstrings of the Python standard library's own modules, classes and functions
(``ast.get_docstring`` on the ``.py`` files of the running interpreter's stdlib directory, read
as source and never imported), in sorted file order. License: the Python Software Foundation
License, as CPython itself (https://docs.python.org/3/license.html).

Why this source: it is on every installation, it is mostly English prose, and it is a different
text from ``strata.evaluation.english_eval_text`` (CPython's ``pydoc_data`` help topics, which
come from the Language and Library Reference, not from docstrings). A quantizer calibrated on
the text its perplexity is measured on would grade itself; so the ``pydoc_data`` package is
skipped, and any paragraph that also occurs in the evaluation text is dropped (the test suite
checks that no paragraph is shared). The same prose filter as the evaluation text drops code
examples and doctests. Deterministic for one Python version.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path

from strata.evaluation.text import _prose_paragraphs, english_eval_text

SOURCE_NAME = "CPython standard library docstrings (PSF License)"
# Not part of the library's own code, or the evaluation text itself.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "pydoc_data",
                 "lib2to3", "turtledemo", "__pycache__"}


def calibration_text(max_chars: int, paragraphs_per_file: int = 12) -> str:
    """At least the first ``max_chars`` characters' worth of whole prose paragraphs of the stdlib's
    docstrings (fewer only if the stdlib runs out), joined by blank lines. At most
    ``paragraphs_per_file`` from each file, so that a few big modules (``_pydecimal`` alone has
    hundreds of near-identical "Returns the ..." paragraphs) do not make up the whole text."""
    if not isinstance(max_chars, int) or isinstance(max_chars, bool) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive int, got {max_chars!r}")
    held_out = set(english_eval_text(max_chars=10**9).split("\n\n"))
    kept: list[str] = []
    size = 0
    for path in _stdlib_sources():
        paragraphs = (p for doc in _docstrings(path) for p in _prose_paragraphs(doc) if p not in held_out)
        for _, paragraph in zip(range(paragraphs_per_file), paragraphs):
            kept.append(paragraph)
            size += len(paragraph) + 2
            if size >= max_chars:
                return "\n\n".join(kept)
    return "\n\n".join(kept)


def _stdlib_sources():
    root = Path(sysconfig.get_paths()["stdlib"])
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath) / name


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return   # a test fixture or a Python 2 leftover
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc
