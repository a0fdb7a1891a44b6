"""Duplicate-id detection over millions of ids in little memory: 64-bit digests, kept flat."""

from __future__ import annotations

from array import array

__all__ = ["MASK", "SHIFT", "IdDigests", "id_digest"]

# Digests are hash() & MASK: 64 bits (a test narrows it to make every digest collide).
MASK = (1 << 64) - 1
# Digests go to one of 2**_BITS lists by their top bits, so that finding the repeats holds
# one list's set at a time (a set of a million ints takes some 70 MB; a list's, 1 MB).
_BITS = 6


def id_digest(folder: str) -> int:
    """A 64-bit digest of a folder key (a repeat is then confirmed on the keys themselves)."""
    # str's own hash is computed in C (SipHash, salted per process): ample for a set that
    # lives one validation, and several times cheaper than a hashlib digest per id.
    return hash(folder) & MASK


class IdDigests:
    """The digests of every id of a manifest, 8 bytes each; which of them occur twice."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        # Appended to directly by the check loop: `parts[digest >> SHIFT].append(digest)`.
        self.parts = [array("Q") for _ in range(1 << _BITS)]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def add(self, digest: int) -> None:
        """Note one id's digest."""
        self.parts[digest >> SHIFT].append(digest)

    def repeated(self) -> set[int]:
        """The digests noted more than once (the lists are emptied on the way)."""
        found: set[int] = set()
        for index, part in enumerate(self.parts):
            if len(set(part)) != len(part):
                seen: set[int] = set()
                for digest in part:
                    if digest in seen:
                        found.add(digest)
                    seen.add(digest)
            self.parts[index] = array("Q")
        return found


SHIFT = 64 - _BITS
