"""Reason codes and transform names used in every data stage's ``report.json``.

They are part of the on-disk contract: users grep for them and ``docs/data.md`` documents each one (a test
checks that the table and this module agree), so rename none of them.
"""

from __future__ import annotations

# Why an input item was skipped. Codes in IGNORED are bookkeeping, not bad data: they do not count towards
# ``max_reject_fraction`` (a zip made on a Mac has as many ``._*`` members as images).
REASONS: dict[str, str] = {
    "ok": "kept (possibly normalised, see transforms)",
    "duplicate": "same bytes or same decoded pixels as an earlier item",
    "near_duplicate": "perceptual hash within `near_duplicate_distance` of an earlier item",
    "junk_member": "OS metadata: `__MACOSX/`, `._*`, `.DS_Store`, `Thumbs.db`, `desktop.ini`, hidden files",
    "symlink": "a symbolic link (zip member or file in a folder); never followed",
    "nested_archive": "an archive inside a source (zip, tar, gzip, 7z, rar); not unpacked",
    "encrypted": "an encrypted zip member",
    "empty_file": "zero bytes",
    "not_an_image": "the bytes are no image format sdtune knows",
    "unsupported_format": "a known image format outside the allowlist (HEIC, AVIF, …)",
    "too_large_file": "more bytes than `max_image_bytes`",
    "pixel_bomb": "more pixels than `max_image_pixels` (decompression bomb)",
    "truncated": "the file ends before the image data does",
    "corrupt": "the decoder failed on the image data",
    "too_small": "shorter side below `min_side`",
    "extreme_aspect": "long side / short side above `max_aspect_ratio`",
    "unreadable": "the file or object could not be read",
    "missing_file": "a catalogue row names a file that does not exist",
    "bad_row": "a catalogue row without a usable image column (or naming a bucket that is not allowed)",
    "special_file": "a FIFO, socket or device file; never opened",
    "blocked_address": "a URL resolves to a private, loopback, link-local or metadata address",
    "fetch_failed": "a URL or S3 object could not be fetched (status, timeout, too many redirects)",
    # Not a skip: the item is kept (status normalised) with a caption cut to the tokenizer's limit.
    "caption_truncated": "caption longer than `max_tokens` of the training tokenizer; cut at a word boundary",
}
IGNORED = frozenset({"duplicate", "near_duplicate", "junk_member"})


class SkipItem(Exception):
    """Raised while reading or decoding one item: the item is reported as skipped, the run goes on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
