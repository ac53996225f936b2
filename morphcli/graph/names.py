"""The names torch.fx pastes into the Python source of a GraphModule's ``forward``.

fx writes placeholder targets, keyword-argument keys and attribute paths into the generated code
as they are (``torch.relu(input = x)``, ``self.features.conv``), so a name from a file must pass
a strict grammar before fx sees it: one bad kwargs key is code that runs on load. The same
grammar applies to models that arrive as Python objects (pickled models, ``--arch``), so that
whatever morph loads it can also save and load again.

Soft keywords (``match``, ``case``, ``type``, ``_``) parse as plain names: allowed.
"""

from __future__ import annotations

import builtins
import functools
import keyword
import re

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")  # ASCII only: str.isidentifier takes unicode
_PART = re.compile(r"[A-Za-z0-9_-]+\Z")  # a layer path part: "fc", "0" (Sequential), "block1-0"
KEYWORDS = frozenset(keyword.kwlist)

# Builtins the generated code itself refers to (getattr for paths such as ``features.0``, the
# reprs of slices, complex numbers and ``...``); an input of that name would shadow them.
_CODEGEN_BUILTINS = frozenset({"getattr", "slice", "complex", "Ellipsis"})


@functools.cache
def _fx_globals() -> frozenset[str]:
    """The globals fx's generated code imports (``torch``, ``device``, ``inf``, ...)."""
    names = {"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree"}
    try:
        from torch.fx.graph import _custom_builtins  # private; the set above is the fallback

        names |= set(_custom_builtins)
    except ImportError:  # pragma: no cover - depends on the torch version
        pass
    return frozenset(names)


@functools.cache
def _module_attrs(top: bool) -> frozenset[str]:
    """Attributes every torch module has (and, at the top, every GraphModule: ``graph``,
    ``code``, ``meta``): a layer of that name would be shadowed by them or overwrite them."""
    import torch.fx as fx
    from torch import nn

    names = set(dir(nn.Module)) | set(vars(nn.Module()))
    if top:
        names |= set(dir(fx.GraphModule)) | set(vars(fx.GraphModule(nn.Module(), fx.Graph())))
    return frozenset(names)


def identifier_problem(name: object) -> str | None:
    """Why ``name`` cannot be a keyword-argument key or attribute in generated code, or None."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if not _IDENT.match(name):
        return ("is not an ASCII identifier (letters, digits and '_', not starting with a "
                "digit)")
    if name in KEYWORDS:
        return "is a Python keyword"
    return None


def input_problem(name: object) -> str | None:
    """Why ``name`` cannot be an input (a ``forward`` parameter), or None. Builtins such as
    ``input`` may be shadowed, except those the generated code uses."""
    problem = identifier_problem(name)
    if problem is None and (name == "self" or name in _fx_globals()
                            or name in _CODEGEN_BUILTINS):
        problem = "is a name torch.fx's generated code uses itself"
    return problem


def node_name_problem(name: object) -> str | None:
    """Why ``name`` cannot be a node's name, or None. fx itself never gives a node the name of a
    builtin, keyword or one of its globals, nor ``self`` (the module)."""
    problem = identifier_problem(name)
    if problem is None and (name == "self" or name in _fx_globals()
                            or name in vars(builtins)):
        problem = "is a name torch.fx reserves"
    return problem


def path_problem(path: object) -> str | None:
    """Why ``path`` (a layer or tensor path, ``layer1.0.conv``) cannot be named in generated
    code, or None. Parts that are not identifiers (``0``, ``block1-0``) are fine: fx writes
    ``getattr(self.layer1, "0")`` for them."""
    if not isinstance(path, str):
        return f"is a {type(path).__name__}, not a string"
    for i, part in enumerate(path.split(".")):
        problem = part_problem(part, top=i == 0)
        if problem:
            return problem if "." not in path else f"part {part!r} {problem}"
    return None


def part_problem(part: str, top: bool = False) -> str | None:
    """Why ``part`` cannot be one name in a layer path (``top``: a layer of the model itself)."""
    if not _PART.match(part):
        return "has characters other than ASCII letters, digits, '_' and '-'"
    if part in KEYWORDS:
        return "is a Python keyword"
    if part == "self":
        return "is the name torch.fx's generated code gives the model itself"
    if part in _module_attrs(top):
        owner = "GraphModule" if top and part not in _module_attrs(False) else "torch module"
        return f"is an attribute of every {owner} (it would be shadowed or overwritten)"
    return None
