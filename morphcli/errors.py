"""The one exception family the core raises; only the CLI turns them into exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3


class MorphError(Exception):
    """Base of every error morphcli raises on purpose. ``exit_code`` is what the CLI returns."""

    exit_code = EXIT_USAGE


class InputError(MorphError):
    """A file, path or option the user gave cannot be used."""


class UnsafeCheckpointError(InputError):
    """The checkpoint needs code that is not allowlisted; loading it needs --trust."""


class TraceError(InputError):
    """torch.fx cannot turn the model into a graph."""


class UnsupportedMorphError(MorphError):
    """The morph cannot be applied exactly to this layer; the message says why."""


class NotEquivalentError(MorphError):
    """Two models differ beyond tolerance."""

    exit_code = EXIT_NOT_EQUIVALENT


class MorphWarning(UserWarning):
    """Something the user should know that does not stop the command (the core never prints:
    it warns, and the CLI shows each warning as one ``warning: ...`` line on stderr)."""


class NonFiniteWeightsWarning(MorphWarning):
    """The model's weights hold NaN or Inf, so its outputs cannot be trusted or checked."""
