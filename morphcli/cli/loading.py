"""Turn the shared loading options into a loaded model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from morphcli.cli.console import require_stdin, shapes_arg


@dataclass(frozen=True)
class LoadOptions:
    arch: str | None = None
    arch_kwargs: str | None = None
    trust: bool = False
    input_shape: tuple[str, ...] = ()
    key: str | None = None  # the model entry of a training checkpoint

    @staticmethod
    def of(arch: str | None, arch_kwargs: str | None, trust: bool,
           input_shape: list[str] | None, key: str | None = None) -> LoadOptions:
        return LoadOptions(arch, arch_kwargs, trust, tuple(input_shape or ()), key)

    def kwargs(self) -> dict[str, Any]:
        from morphcli.io.arch import parse_kwargs

        return {
            "arch": self.arch,
            "arch_kwargs": parse_kwargs(self.arch_kwargs),
            "trust": self.trust,
            "input_shapes": shapes_arg(list(self.input_shape)),
        }

    def load(self, source: str):  # -> torch.fx.GraphModule (torch imported lazily)
        if source == "-":
            require_stdin()
        from morphcli.io.api import load

        return load(source, **self.kwargs(), key=self.key)
