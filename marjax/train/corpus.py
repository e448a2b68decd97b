"""The embedded default corpus: the help() topic texts that ship with CPython
(`pydoc_data.topics`), so the default pipeline needs no download. About 80 documents and
0.5 MB of English prose with code, under the Python Software Foundation license.
"""
from __future__ import annotations

import platform

__all__ = ["default_documents", "default_text", "default_source"]


def _topics() -> dict:
    from pydoc_data.topics import topics  # late import: a 1 MB module, only needed for the embedded corpus
    return topics


def default_documents() -> list[str]:
    """One document per pydoc topic, in sorted topic order (deterministic for a Python version)."""
    topics = _topics()
    return [topics[k] for k in sorted(topics)]


def default_text() -> str:
    """The whole corpus as one string: the topics in sorted key order joined by blank lines."""
    return "\n\n".join(default_documents())


def default_source() -> str:
    """A one-line description of where the embedded corpus comes from."""
    topics = _topics()
    n_chars = sum(len(v) for v in topics.values())
    return (f"pydoc_data.topics of CPython {platform.python_version()} (the help() topic texts, PSF license): "
            f"{len(topics)} documents, {n_chars} characters")
