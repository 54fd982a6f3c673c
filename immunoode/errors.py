"""Exception types raised by immunoode.

Every user-facing error carries *where* it happened (file, section, item) so that
the command line can print it as one clear line.
"""

from __future__ import annotations


class ImmunoodeError(Exception):
    """Base class of every error immunoode raises on purpose."""


class ModelError(ImmunoodeError, ValueError):
    """A model definition is invalid.

    Parameters
    ----------
    message : what is wrong.
    file : path of the model file, if any.
    section : TOML section (``states``, ``parameters``, ``odes`` ...), if any.
    item : the name inside the section, if any.
    """

    def __init__(self, message: str, *, file=None, section=None, item=None):
        self.message = message
        self.file = None if file is None else str(file)
        self.section = section
        self.item = item
        super().__init__(self._format())

    def _format(self) -> str:
        where = []
        if self.file:
            where.append(self.file)
        if self.section:
            where.append(f"[{self.section}]")
        if self.item:
            where.append(repr(self.item))
        prefix = " ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message

    def located(self, *, file=None, section=None, item=None) -> "ModelError":
        """Return a copy with missing location fields filled in."""
        return type(self)(
            self.message,
            file=self.file or file,
            section=self.section or section,
            item=self.item or item,
        )


class ExpressionError(ModelError):
    """An expression string could not be parsed (syntax or forbidden construct)."""


class UnitError(ModelError):
    """Dimensional inconsistency or an unknown unit."""


class RegimenError(ModelError):
    """A dosing regimen is invalid."""


class SimulationError(ImmunoodeError, RuntimeError):
    """The integrator failed (step size underflow, non-finite state, ...)."""


class CalibrationError(ImmunoodeError, RuntimeError):
    """A fit could not be carried out (e.g. every arm's simulation failed)."""


def did_you_mean(name, candidates, cutoff: float = 0.6) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``candidates`` to ``name``, or ``""``."""
    import difflib
    match = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=1, cutoff=cutoff)
    return f" (did you mean {match[0]!r}?)" if match else ""
