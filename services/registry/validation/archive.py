"""Unpacking an upload into adapter_config.json bytes and a weights file, defensively.

The body is hostile until proven otherwise. For a zip we read only the central directory
first and refuse, before inflating a byte: too many entries, absolute paths, `..`, links
and other special files, encrypted entries, files other than the two we accept (pickled
weights get their own message: we never unpickle), a declared uncompressed total above the
limit, or an entry whose compression ratio is bomb-like. While inflating we count real
bytes too, because a header can lie about sizes. zipfile checks each entry's CRC.
README.md (which PEFT's save_pretrained writes) is allowed and ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import stat
import zipfile
from pathlib import Path
from typing import BinaryIO

from services.common.errors import InvalidArgument

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
IGNORED_FILES = ("README.md",)
MAX_CONFIG_BYTES = 1024 * 1024
# Entries smaller than this cannot be bombs, whatever their ratio (a JSON config compresses well).
_RATIO_FLOOR_BYTES = 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_COPY_CHUNK = 4 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    max_upload_bytes: int
    max_rank: int
    max_archive_files: int
    max_zip_ratio: int


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    """The two files of an upload: config bytes in memory, weights in a temp file."""

    config_bytes: bytes
    weights_path: Path
    weights_size: int
    weights_sha256: str


def _refuse(message: str, reason: str = "BAD_ARCHIVE", **metadata: object) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, **metadata)


def _check_name(name: str, where: str) -> None:
    """Refuses names we never accept, whatever the archive kind."""
    if name.lower().endswith(_PICKLE_SUFFIXES):
        raise _refuse(f"{where}: '{name}' holds pickled weights, which are refused because loading a pickle "
                      f"can run arbitrary code; save the adapter as {WEIGHTS_FILE} "
                      "(save_pretrained(..., safe_serialization=True))", reason="PICKLE_REFUSED",
                      file=name, expected=WEIGHTS_FILE, actual=name)
    if name not in (CONFIG_FILE, WEIGHTS_FILE, *IGNORED_FILES):
        raise _refuse(f"{where}: unexpected file '{name}'; an adapter holds only {CONFIG_FILE} and {WEIGHTS_FILE}",
                      reason="UNEXPECTED_FILE", file=name, expected=f"{CONFIG_FILE}|{WEIGHTS_FILE}", actual=name)


def _copy_hashed(source: BinaryIO, target_path: Path, limit: int, what: str) -> tuple[int, str]:
    """Copies at most `limit` bytes, refusing more; returns (size, sha256 hex)."""
    digest, size = hashlib.sha256(), 0
    with open(target_path, "wb") as target:
        while chunk := source.read(_COPY_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _refuse(f"{what} inflates beyond {limit} bytes (its declared size or the upload limit)",
                              reason="ARCHIVE_TOO_LARGE", file=what, expected=f"<= {limit} bytes")
            digest.update(chunk)
            target.write(chunk)
    return size, digest.hexdigest()


def _zip_members(archive: zipfile.ZipFile, limits: UploadLimits) -> dict[str, zipfile.ZipInfo]:
    infos = archive.infolist()
    if len(infos) > limits.max_archive_files:
        raise _refuse(f"zip has {len(infos)} entries; at most {limits.max_archive_files} are allowed",
                      reason="TOO_MANY_FILES", expected=f"<= {limits.max_archive_files}", actual=len(infos))
    members: dict[str, zipfile.ZipInfo] = {}
    folders: set[str] = set()
    total = 0
    for info in infos:
        name = info.filename
        if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or "\\" in name:
            raise _refuse(f"zip entry '{name}' has an absolute or non-POSIX path; entries must be relative",
                          reason="UNSAFE_PATH", file=name)
        parts = name.rstrip("/").split("/")
        if ".." in parts or "." in parts or "" in parts:
            raise _refuse(f"zip entry '{name}' contains '..', '.' or an empty path part (path traversal)",
                          reason="UNSAFE_PATH", file=name)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _refuse(f"zip entry '{name}' is a symbolic link; links are not allowed", reason="UNSAFE_PATH",
                          file=name)
        if info.is_dir():
            continue
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):  # 0: no Unix mode recorded (e.g. Windows zips)
            raise _refuse(f"zip entry '{name}' is not a regular file (mode {oct(mode)})", reason="UNSAFE_PATH",
                          file=name)
        if info.flag_bits & 0x1:
            raise _refuse(f"zip entry '{name}' is encrypted", reason="BAD_ARCHIVE", file=name)
        base = parts[-1]
        _check_name(base, "zip")
        if base in members:
            raise _refuse(f"zip holds '{base}' twice ('{members[base].filename}' and '{name}')",
                          reason="DUPLICATE_FILE", file=base)
        folders.add("/".join(parts[:-1]))
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > _RATIO_FLOOR_BYTES and ratio > limits.max_zip_ratio:
            raise _refuse(f"zip entry '{name}' expands {ratio:.0f}x ({info.compress_size} -> {info.file_size} "
                          f"bytes); at most {limits.max_zip_ratio}x is allowed (zip bomb guard)",
                          reason="ZIP_BOMB", file=name, expected=f"<= {limits.max_zip_ratio}x",
                          actual=f"{ratio:.0f}x")
        total += info.file_size
        members[base] = info
    if len(folders) > 1:
        raise _refuse(f"zip files are spread over several folders ({', '.join(sorted(folders))}); "
                      "put them side by side", reason="BAD_ARCHIVE")
    if total > limits.max_upload_bytes:
        raise _refuse(f"zip unpacks to {total} bytes; at most {limits.max_upload_bytes} are allowed",
                      reason="ARCHIVE_TOO_LARGE", expected=f"<= {limits.max_upload_bytes}", actual=total)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in members:
            raise _refuse(f"zip has no {required}; an adapter zip holds {CONFIG_FILE} and {WEIGHTS_FILE}",
                          reason="MISSING_FILE", file=required)
    return members


def unpack_zip(upload: Path, workdir: Path, limits: UploadLimits) -> AdapterFiles:
    try:
        archive = zipfile.ZipFile(upload)
    except (zipfile.BadZipFile, OSError) as exc:
        raise _refuse(f"upload is not a readable zip archive ({exc})", reason="BAD_ARCHIVE") from None
    with archive:
        members = _zip_members(archive, limits)
        weights_path = workdir / WEIGHTS_FILE
        try:
            config_info = members[CONFIG_FILE]
            if config_info.file_size > MAX_CONFIG_BYTES:
                raise _refuse(f"{CONFIG_FILE} is {config_info.file_size} bytes; at most {MAX_CONFIG_BYTES}",
                              reason="ARCHIVE_TOO_LARGE", file=CONFIG_FILE)
            with archive.open(config_info) as source:
                config_bytes = source.read(MAX_CONFIG_BYTES + 1)
            if len(config_bytes) > MAX_CONFIG_BYTES:
                raise _refuse(f"{CONFIG_FILE} inflates beyond {MAX_CONFIG_BYTES} bytes", reason="ARCHIVE_TOO_LARGE",
                              file=CONFIG_FILE)
            weights_info = members[WEIGHTS_FILE]
            with archive.open(weights_info) as source:
                size, sha = _copy_hashed(source, weights_path, min(weights_info.file_size, limits.max_upload_bytes),
                                         WEIGHTS_FILE)
        except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError) as exc:
            raise _refuse(f"zip entry cannot be read ({exc})", reason="BAD_ARCHIVE") from None
    return AdapterFiles(config_bytes, weights_path, size, sha)


def check_files_header(files: list[tuple[str, int]], limits: UploadLimits) -> None:
    """ADAPTER_ARCHIVE_FILES: the header must list exactly our two files, within the limits."""
    seen: set[str] = set()
    for name, size in files:
        _check_name(name, "header.files")
        if name in IGNORED_FILES:
            raise _refuse(f"header.files: '{name}' is not accepted with ADAPTER_ARCHIVE_FILES; send only "
                          f"{CONFIG_FILE} and {WEIGHTS_FILE}", reason="UNEXPECTED_FILE", file=name)
        if name in seen:
            raise _refuse(f"header.files lists '{name}' twice", reason="DUPLICATE_FILE", file=name)
        if name == CONFIG_FILE and size > MAX_CONFIG_BYTES:
            raise _refuse(f"{CONFIG_FILE} is {size} bytes; at most {MAX_CONFIG_BYTES}", reason="ARCHIVE_TOO_LARGE",
                          file=CONFIG_FILE, expected=f"<= {MAX_CONFIG_BYTES}", actual=size)
        seen.add(name)
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if required not in seen:
            raise _refuse(f"header.files has no {required}", reason="MISSING_FILE", file=required)
    declared = sum(size for _, size in files)
    if declared > limits.max_upload_bytes:
        raise _refuse(f"header.files declare {declared} bytes; uploads are limited to {limits.max_upload_bytes}",
                      reason="UPLOAD_TOO_LARGE", field="header.files", expected=f"<= {limits.max_upload_bytes}",
                      actual=declared)


class UploadReceiver:
    """Takes the body as it arrives, refusing a byte past the limit.

    A zip is spooled to one file (reading it needs random access). FILES bodies are split on
    the fly: the config into memory and the weights straight into their own file while they
    are hashed, so 100 MB of weights are written to disk once, not spooled and copied.
    """

    def __init__(self, workdir: Path, archive: str, files: list[tuple[str, int]], max_bytes: int,
                 hash_body: bool) -> None:
        self.workdir, self.archive, self.size, self._max = workdir, archive, 0, max_bytes
        self._body_digest = hashlib.sha256() if hash_body else None
        self._segments = list(files)
        self._segment, self._left = 0, files[0][1] if files else 0
        self._config = bytearray()
        self._weights_digest, self._weights_size = hashlib.sha256(), 0
        target = workdir / (WEIGHTS_FILE if archive == "files" else "upload.zip")
        self._file = open(target, "wb")

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self._max:
            raise _refuse(f"upload is larger than the {self._max}-byte limit (--max-upload-mb)",
                          reason="UPLOAD_TOO_LARGE", expected=f"<= {self._max}", actual=f">= {self.size}")
        if self._body_digest is not None:
            self._body_digest.update(chunk)
        if self.archive != "files":
            self._file.write(chunk)
            return
        view = memoryview(chunk)
        while view:
            while self._left == 0 and self._segment < len(self._segments) - 1:
                self._segment += 1
                self._left = self._segments[self._segment][1]
            if self._left == 0:
                raise _refuse(f"received more than the {sum(s for _, s in self._segments)} bytes header.files "
                              "declares", reason="SIZE_MISMATCH")
            part, view = view[:self._left], view[self._left:]
            self._left -= len(part)
            if self._segments[self._segment][0] == CONFIG_FILE:
                self._config += part
            else:
                self._weights_digest.update(part)
                self._weights_size += len(part)
                self._file.write(part)

    def close(self) -> str:
        """Flushes what was received; returns the sha256 of the whole body ("" when not hashed)."""
        self._file.close()
        return self._body_digest.hexdigest() if self._body_digest is not None else ""

    def unpack(self, limits: UploadLimits) -> AdapterFiles:
        if self.archive != "files":
            return unpack_zip(self.workdir / "upload.zip", self.workdir, limits)
        declared = sum(size for _, size in self._segments)
        if self.size != declared:
            raise _refuse(f"received {self.size} bytes but header.files declares {declared}", reason="SIZE_MISMATCH",
                          expected=declared, actual=self.size)
        return AdapterFiles(bytes(self._config), self.workdir / WEIGHTS_FILE, self._weights_size,
                            self._weights_digest.hexdigest())
