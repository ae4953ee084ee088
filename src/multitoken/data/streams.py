"""One input file's bytes, decompressed and checked: plain, gzip (``.gz``) or zstd (``.zst``).

:func:`open_checked` is the one way a data reader opens a stream file (a JSONL shard). The
stream it returns:

- reads only a regular file (the caller opens it with
  :func:`~multitoken.data.documents.open_regular`);
- counts the bytes read from disk into the source's ``bytes_read`` (the progress bar's);
- never ends early in silence: a truncated, corrupt or mislabelled archive raises
  :class:`DamagedFile` naming what is wrong, and the zstd reader reads every frame of a
  multi-frame file and checks that the last one is complete (``zstandard``'s own readers
  return a cut file as shorter, or empty, without a word);
- is bounded: more than ``max_expanded_mb`` of decompressed bytes from one file is a
  :class:`~multitoken.errors.DataError` naming the file and the setting, and a long read
  prints a progress line (MB expanded from MB read) every :data:`PROGRESS_EVERY_S` seconds,
  so a small file that expands into a flood of blank lines is visible while it is read;
- holds at most a few MB however the data compresses (zstd is fed 256 bytes at a time, which
  expands to at most about 11 MB).
"""

from __future__ import annotations

import gzip
import io
import sys
import time
import zlib
from typing import IO

from multitoken.data.columnar import import_optional
from multitoken.data.documents import one_line
from multitoken.errors import DataError

__all__ = ["PROGRESS_EVERY_S", "DamagedFile", "open_checked"]

PROGRESS_EVERY_S = 10.0
_MB = 1_000_000
_DISK_BUFFER = 1 << 16
_EXPANDED_BUFFER = 1 << 20
# Compressed bytes handed to the zstd decompressor at once: a zstd block of 3 bytes can stand
# for 128 KB, so 256 bytes expand to at most ~11 MB.
_ZSTD_FEED = 256

# The functions take the Source they read for (``source``), typed loosely: this module sits
# below sources.py.
Source = object


class DamagedFile(Exception):
    """A file that cannot be read to its end: truncated, corrupt, or not what its name says."""


class _Counting(io.RawIOBase):
    """A binary file that counts the bytes read from disk (the source's and its own)."""

    def __init__(self, raw: IO[bytes], source: Source) -> None:
        self.raw, self.source, self.count = raw, source, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self.raw.readinto(buffer) or 0
        self.source.bytes_read += count
        self.count += count
        return count

    def close(self) -> None:
        self.raw.close()
        super().close()


class _Zstd(io.RawIOBase):
    """zstd frames, one after another, decompressed; a frame cut short is :class:`DamagedFile`."""

    def __init__(self, compressed: IO[bytes]) -> None:
        self.zstandard = import_optional("zstandard", ".jsonl.zst files")
        self.compressed = compressed
        self.decompressor = self.zstandard.ZstdDecompressor()
        self.frame = None  # the decompressobj of the frame being read, if one is open
        self.unused = b""
        self.pending, self.offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset >= len(self.pending):
            if not self._fill():
                return 0
        count = min(len(buffer), len(self.pending) - self.offset)
        buffer[:count] = self.pending[self.offset : self.offset + count]
        self.offset += count
        return count

    def _fill(self) -> bool:
        data, self.unused = self.unused or self.compressed.read(_ZSTD_FEED), b""
        if not data:
            if self.frame is not None:
                raise DamagedFile("truncated: the zstd data ends inside a frame")
            return False
        self.frame = self.frame or self.decompressor.decompressobj()
        try:
            self.pending, self.offset = self.frame.decompress(data), 0
        except self.zstandard.ZstdError as err:
            raise DamagedFile(f"corrupt zstd data ({one_line(err)})") from None
        if self.frame.eof:  # the next frame, if any, starts in what is left
            self.unused, self.frame = self.frame.unused_data, None
        return True

    def close(self) -> None:
        self.compressed.close()
        super().close()


class _Checked(io.RawIOBase):
    """The expanded stream: errors named, expanded bytes counted, bounded and shown."""

    def __init__(self, stream: IO[bytes], disk: _Counting, name: str, limit_mb: float) -> None:
        self.stream, self.disk, self.name, self.limit_mb = stream, disk, name, limit_mb
        self.expanded = 0
        self.compressed = stream is not disk
        self.started = self.shown = time.monotonic()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            count = self.stream.readinto(buffer) or 0
        except EOFError:
            raise DamagedFile("truncated: the gzip data ends before its end marker") from None
        except gzip.BadGzipFile as err:
            what = "not a gzip file" if str(err).startswith("Not a gzipped") else "corrupt gzip"
            raise DamagedFile(f"{what} ({' '.join(str(err).split())})") from None
        except zlib.error as err:
            raise DamagedFile(f"corrupt gzip data ({one_line(err)})") from None
        except OSError as err:
            raise DamagedFile(f"unreadable ({err.strerror or err})") from None
        self.expanded += count
        if not self.compressed:
            return count
        if self.limit_mb and self.expanded > self.limit_mb * _MB:
            raise DataError(
                f"{self.name}: expands to more than data.max_expanded_mb={self.limit_mb:g} MB "
                f"(from {self.disk.count / _MB:,.1f} MB read): a damaged file or a "
                "decompression bomb; split the file or raise data.max_expanded_mb"
            )
        now = time.monotonic()
        if now - self.shown >= PROGRESS_EVERY_S:
            self.shown = now
            print(
                f"multitoken: reading {self.name}: {self.expanded / _MB:,.0f} MB expanded from "
                f"{self.disk.count / _MB:,.1f} MB read in {now - self.started:.0f} s "
                f"(limit data.max_expanded_mb={self.limit_mb:g})",
                file=sys.stderr,
                flush=True,
            )
        return count

    def close(self) -> None:
        self.stream.close()
        super().close()


def open_checked(file: IO[bytes], name: str, source: Source, max_expanded_mb: float) -> IO[bytes]:
    """The decompressed bytes of ``file`` (opened by the caller), by its name's suffix.

    Reading raises :class:`DamagedFile` when the data is cut short or corrupt, and
    :class:`~multitoken.errors.DataError` past ``max_expanded_mb`` of a compressed file
    (0 = no limit; a plain file is neither limited nor shown).
    """
    disk = _Counting(file, source)
    suffix = name.lower().rsplit(".", 1)[-1]
    if suffix == "gz":
        stream: IO[bytes] = gzip.GzipFile(fileobj=io.BufferedReader(disk, _DISK_BUFFER))
    elif suffix == "zst":
        stream = _Zstd(io.BufferedReader(disk, _DISK_BUFFER))
    else:
        stream = disk
    return io.BufferedReader(_Checked(stream, disk, name, max_expanded_mb), _EXPANDED_BUFFER)
