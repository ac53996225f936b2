"""Recognise a file's real format from its first bytes, for messages about wrong suffixes."""

from __future__ import annotations

import struct

from morphcli.errors import InputError

ZIP = b"PK\x03\x04"


def sniff(head: bytes) -> str | None:
    """The suffix whose format ``head`` (the first 64 KiB or so) looks like, or None."""
    if head.startswith(ZIP):
        return ".pt"  # torch.save archives and .pt2 programs are both zip files
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return ".pt"  # legacy (non-zip) torch.save pickle
    if len(head) >= 10:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{":
            from morphcli.graph.describe import parse_description  # torch: only when needed

            try:
                parse_description(head[8 : 8 + n], "header", "safetensors header")
                return ".safetensors"
            except InputError:  # not JSON, or nested too deep to parse safely
                if n > len(head) - 8:
                    return ".safetensors"
    if head[:1] == b"\x08" and b"pytorch" in head[:256].lower() or b"onnx" in head[:64].lower():
        return ".onnx"
    return None


def is_zip(head: bytes) -> bool:
    return head.startswith(ZIP)
