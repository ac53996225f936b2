"""Reading within a budget: stdin, FIFOs and compressed zip members (graph.budget's caps)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from morphcli.errors import InputError
from morphcli.graph.budget import MAX_READ_BYTES, BudgetError, require

_CHUNK = 1 << 20


def read_bounded(stream: BinaryIO, what: str,
                 accept: Callable[[bytes], bool] | None = None) -> bytes:
    """Everything ``stream`` holds, read in chunks, refused past MORPH_MAX_READ_BYTES. After the
    first 64 KiB, ``accept(head)`` False stops at once (``/dev/urandom`` on stdin is not
    read until memory runs out)."""
    limit = MAX_READ_BYTES.limit()
    buf = io.BytesIO()
    checked = accept is None
    while True:
        chunk = stream.read(min(_CHUNK, limit + 1 - buf.tell()) or 1)
        if not chunk:
            break
        buf.write(chunk)
        if accept is not None and not checked and buf.tell() >= 64 * 1024:
            checked = True
            if not accept(buf.getbuffer()[: 64 * 1024].tobytes()):
                break
        if buf.tell() > limit:
            require(MAX_READ_BYTES, buf.tell(), f"{what}: more than",
                    "pass the model as a file path, or ")
    return buf.getvalue()


def check_zip(what: str, data: Path | bytes) -> None:
    """Refuse a zip (torch.save, .pt2) whose compressed members inflate past
    MORPH_MAX_READ_BYTES: torch decompresses a member into memory whole, before it checks
    that the size is the one the archive needs. Declared sizes are summed first; then each
    compressed member is inflated in chunks, counted, and its CRC checked (zipfile never
    returns more than the declared size)."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        z = zipfile.ZipFile(source)
    except Exception:
        return  # not a readable zip: the format's reader reports the damage
    hint = "a model saved by torch stores its tensors uncompressed; "
    with z:
        packed = [i for i in z.infolist() if i.compress_type != zipfile.ZIP_STORED]
        require(MAX_READ_BYTES, sum(i.file_size for i in packed),
                f"{what}: compressed zip members declare", hint)
        limit, total = MAX_READ_BYTES.limit(), 0
        for info in packed:
            try:
                with z.open(info) as member:
                    while chunk := member.read(_CHUNK):
                        total += len(chunk)
                        if total > limit:
                            require(MAX_READ_BYTES, total, f"{what}: zip members inflate to",
                                    hint)
            except BudgetError:
                raise
            except Exception as e:
                raise InputError(f"{what}: damaged zip member {info.filename!r}: {e}") from e
