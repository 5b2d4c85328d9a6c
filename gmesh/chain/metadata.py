"""Reading request metadata the way filters need it: gRPC metadata is an ordered list of
(key, value) pairs, keys lowercase, a key may repeat, and `-bin` keys carry bytes."""

from __future__ import annotations

Metadata = tuple[tuple[str, str | bytes], ...]


def metadata_value(metadata: Metadata, key: str) -> str | None:
    """The first value of `key` (lowercase) in `metadata`, or None; `-bin` values as latin-1."""
    for k, v in metadata:
        if k == key:
            return v if isinstance(v, str) else v.decode("latin-1")
    return None


def metadata_values(metadata: Metadata, key: str) -> list[str | bytes]:
    """Every value of `key` (lowercase) in `metadata`, in order (`-bin` values as bytes)."""
    return [v for k, v in metadata if k == key]
