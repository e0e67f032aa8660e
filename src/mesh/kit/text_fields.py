"""Short text fields that a service stores or names things by: idempotency keys, model names, numbers
written as text.

PostgreSQL's ``text`` refuses NUL (a 500, and in a group commit the failure of every submit sharing the
statement), and a control character in a key or a name is a client's bug, so both are refused up front.
A name a client sent is echoed in errors through :func:`shown`, so that one of any length makes neither a huge
message nor a huge log line or span.
"""

from __future__ import annotations

MAX_IDEMPOTENCY_KEY_CHARS = 256
"""The longest idempotency key any service takes (uploads and jobs alike)."""


def text_problem(value: str, max_chars: int) -> str | None:
    """What is wrong with ``value`` (for a field violation), or None."""
    if len(value) > max_chars:
        return f"is {len(value)} characters; at most {max_chars} are allowed"
    if not value.isprintable():
        bad = next(c for c in value if not c.isprintable())
        return f"holds the control character {bad!r}; send printable text"
    return None


def ascii_digits(text: str) -> bool:
    """Whether ``text`` is a number that :func:`int` reads, written in ASCII digits only (not empty).

    ``str.isdigit()`` alone also passes '²', which ``int()`` refuses (a ValueError, a 500 where a client sent
    it), and '١٢', which ``int()`` reads as 12."""
    return text.isascii() and text.isdigit()


MAX_SHOWN_CHARS = 40
"""How much of a name a client sent (a label key, a parameter name) an error message or field path shows."""


def shown(text: str, max_chars: int = MAX_SHOWN_CHARS) -> str:
    """``text`` as an error shows it: whole, or its first ``max_chars`` characters and an ellipsis."""
    return text if len(text) <= max_chars else text[:max_chars] + "…"
