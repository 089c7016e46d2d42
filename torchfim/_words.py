"""Words around numbers and names in messages: ``1 input`` / ``2 inputs``, ``an int`` / ``a float``, ``module 'a'
takes`` / ``modules 'a', 'b' take``.

Messages built by formatting said "1 inputs", "a int" and "module(s) 'a' take"; they go through these functions
instead.
"""

from __future__ import annotations

import re

__all__ = ["counted", "agreeing", "a_or_an"]

#: Words that start with a vowel letter but not a vowel sound ("a uint8", "a unit", "a one-hot").
_CONSONANT_SOUNDS = ("uint", "uni", "use", "usu", "one", "eu")


def counted(n: int, noun: str, plural: str | None = None, spec: str = "") -> str:
    """``n`` (formatted by ``spec``, e.g. ``","``) and ``noun``, in its plural (``plural``, else ``noun + "s"``)
    unless ``n`` is 1.

    Example:
        >>> counted(1, "input"), counted(2, "input"), counted(1, "entry", "entries"), counted(12000, "run", spec=",")
        ('1 input', '2 inputs', '1 entry', '12,000 runs')
    """
    return f"{n:{spec}} {agreeing(n, noun, plural)}"


def agreeing(n: int, singular: str, plural: str | None = None) -> str:
    """The form of a noun (or a verb, given its ``plural``) that agrees with ``n`` things, where the message names
    them rather than counts them: ``singular`` where ``n`` is 1, else ``plural`` (default ``singular + "s"``).

    Example:
        >>> agreeing(1, "module"), agreeing(2, "module"), agreeing(1, "takes", "take"), agreeing(3, "takes", "take")
        ('module', 'modules', 'takes', 'take')
    """
    return singular if n == 1 else plural or singular + "s"


def a_or_an(word: object) -> str:
    """``word`` after the indefinite article its sound takes: ``an`` before a vowel sound (``an int``, ``an 8%``,
    ``an 11``), ``a`` before the others (``a float``, ``a uint8``, ``a 10%``).

    Example:
        >>> a_or_an("int"), a_or_an("Tensor"), a_or_an("uint8"), a_or_an("8%"), a_or_an("18"), a_or_an("180")
        ('an int', 'a Tensor', 'a uint8', 'an 8%', 'an 18', 'a 180')
    """
    text = str(word)
    digits = re.match(r"\d+", text)
    if digits:
        # said "eight...", or "eleven"/"eighteen" (thousand, million...) where the leading group has two digits
        lead = digits.group()
        vowel = lead[0] == "8" or (lead[:2] in ("11", "18") and len(lead) % 3 == 2)
    else:
        vowel = text[:1].lower() in tuple("aeiou") and not text.lower().startswith(_CONSONANT_SOUNDS)
    return f"{'an' if vowel else 'a'} {text}"
