"""The one exception family the core raises; only the CLI turns them into exit codes."""

from __future__ import annotations

EXIT_OK = 0
EXIT_NOT_EQUIVALENT = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_STREAM = 4  # stdout or stderr was closed or broken: output was lost


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


class StreamError(MorphError):
    """stdout or stderr is closed or broken (a pipe whose reader left): output was lost."""

    exit_code = EXIT_STREAM


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived. A KeyboardInterrupt, so that every cleanup written for
    Ctrl-C (the temporary file of an atomic write) runs for the others too."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(name)
        self.signum = signum
        self.name = name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for a process ended by signal N


class NotEquivalentError(MorphError):
    """Two models differ beyond tolerance."""

    exit_code = EXIT_NOT_EQUIVALENT


class MorphWarning(UserWarning):
    """Something the user should know that does not stop the command (the core never prints:
    it warns, and the CLI shows each warning as one ``warning: ...`` line on stderr)."""


class NonFiniteWeightsWarning(MorphWarning):
    """The model's weights hold NaN or Inf, so its outputs cannot be trusted or checked."""
