"""The library's warnings during a report, kept in the report: a warning of torchfim's (a model ending in a
softmax under the categorical family) can change the meaning of every number, so it belongs beside them in
report.md, report.json and the terminal summary, once each, rather than on the terminal alone.

The library's warnings of padding counted as observed and of inputs with no observed position are left out: the
report says them in notes of its own (:func:`.outputs.unmasked_padding_note`,
:func:`.outputs.unobserved_inputs_note`). The report's own warnings (``torchfim report:``: the time a long report will
take, its kept steps) are passed on at once, as they come (the estimate was shown only once the report it announced
had run); everyone else's are warned again as they were, after the block. A step kept on disk keeps the
library's warnings it raised (:func:`step_warnings`), and a report that reads the step back warns them again
(:func:`warn_again`), so a resumed report holds the warnings of the uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .wording import library_words

__all__ = ["library_warnings", "step_warnings", "warn_again"]

#: The start of a library warning, and of the report's own (warned as they are).
_LIBRARY, _REPORT = "torchfim:", "torchfim report:"
#: Phrases of the library's warnings that the report says in notes of its own, of all its inputs: padding counted as
#: observed (:meth:`torchfim.engine.view.ModelView._name_padding`) and inputs with no observed position
#: (:meth:`~torchfim.engine.view.ModelView._name_unobserved`, per mini-batch).
_NOTED = ("counted as observed since mask= is not set", "no observed position (their mask is False")


@contextmanager
def library_warnings() -> Iterator[list[str]]:
    """Collect torchfim's RuntimeWarnings raised inside the block into the list yielded (each once, in order,
    without its ``torchfim:`` prefix); every other warning is warned again as it came.

    The caller's filters decide inside the block as outside: ``-W error`` raises the first warning where it is
    warned (not after the work, when the warnings are warned again), and a warning the caller ignores is
    neither kept nor warned. A warning shown before the block is caught again (entering the block resets the
    record of what was shown)."""
    kept: list[str] = []
    shown: dict = {}  # the caller's filters, with "default" showing each warning once

    def handle(w: warnings.WarningMessage, finished: bool) -> None:
        text = str(w.message)
        if finished and _kept(w.category, text):
            text = library_words(text[len(_LIBRARY):].strip())  # on the command line, its options' names
            if not any(phrase in text for phrase in _NOTED) and text not in kept:
                kept.append(text)
        else:  # after an error, every warning is warned again: no report will hold them
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=shown, source=w.source)

    with _recorded(handle):
        yield kept


@contextmanager
def _recorded(handle: Callable[[warnings.WarningMessage, bool], None]) -> Iterator[None]:
    """The warnings raised inside the block, each given to ``handle`` with whether the block finished (after an
    error too); the report's own are shown at once, through what shows the caller's warnings (a printer, a
    recorder), as they would be without the block."""
    caught: list[warnings.WarningMessage] = []
    finished = False
    try:
        with warnings.catch_warnings():  # restores showwarning after
            outer = warnings.showwarning

            def shown(message, category, filename, lineno, file=None, line=None) -> None:
                if str(message).startswith(_REPORT):
                    outer(message, category, filename, lineno, file, line)
                else:
                    caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

            warnings.showwarning = shown
            yield
        finished = True
    finally:
        for w in caught:
            handle(w, finished)


def _kept(category: type[Warning], text: str) -> bool:
    return issubclass(category, RuntimeWarning) and text.startswith(_LIBRARY)


@contextmanager
def step_warnings() -> Iterator[list[str]]:
    """The texts of torchfim's RuntimeWarnings raised inside the block, in the list yielded, to keep with a step's
    result; every warning is passed on to the caller's filters as it came (to :func:`library_warnings` around)."""
    said: list[str] = []

    def handle(w: warnings.WarningMessage, finished: bool) -> None:
        if finished and _kept(w.category, str(w.message)):
            said.append(str(w.message))
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry={}, source=w.source)

    with _recorded(handle):  # after an error too: library_warnings around warns them all again then
        yield said


def warn_again(said: list[str]) -> None:
    """Warn the library's warnings of a step read back from disk, as :func:`step_warnings` kept them."""
    for text in said:
        warnings.warn(text, RuntimeWarning, stacklevel=2)
