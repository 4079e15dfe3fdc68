"""Duplicate detection: exact (sha256 of bytes, then of decoded pixels) and near (perceptual hash).

Near-duplicate lookup uses the pigeonhole trick instead of comparing every pair: if two 64-bit hashes
differ in at most ``d`` bits, then splitting them into ``d + 1`` chunks leaves at least one chunk identical,
so candidates come from an exact-match index on chunks. Memory is a few small entries per kept image.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict

import imagehash
from PIL import Image

from sdtune.data.images import pixel_digest_bytes


class Deduplicator:
    def __init__(self, near_distance: int | None) -> None:
        self.near_distance = near_distance
        self._bytes: dict[str, str] = {}
        self._pixels: dict[str, str] = {}
        self._chunks: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)

    def seen_bytes(self, data: bytes) -> tuple[str, str | None]:
        """(sha256 of the bytes, id of an earlier item with the same bytes or None)."""
        digest = hashlib.sha256(data).hexdigest()
        return digest, self._bytes.get(digest)

    def check_image(self, image: Image.Image) -> tuple[str, int, str | None, str | None]:
        """(pixel sha256, phash bits, reason, earlier id) for a decoded image; reason is None when new."""
        pixels = hashlib.sha256(pixel_digest_bytes(image)).hexdigest()
        if pixels in self._pixels:
            return pixels, 0, "duplicate", self._pixels[pixels]
        if self.near_distance is None:
            return pixels, 0, None, None
        bits = int(str(imagehash.phash(image)), 16)
        for key in self._chunk_keys(bits):
            for other, owner in self._chunks.get(key, ()):
                if (bits ^ other).bit_count() <= self.near_distance:
                    return pixels, bits, "near_duplicate", owner
        return pixels, bits, None, None

    def add(self, item_id: str, byte_digest: str, pixel_digest: str, bits: int) -> None:
        self._bytes[byte_digest] = item_id
        self._pixels[pixel_digest] = item_id
        if self.near_distance is not None:
            for key in self._chunk_keys(bits):
                self._chunks[key].append((bits, item_id))

    def _chunk_keys(self, bits: int) -> list[tuple[int, int]]:
        n = self.near_distance + 1
        width = -(-64 // n)
        return [(i, (bits >> (i * width)) & ((1 << width) - 1)) for i in range(n)]
