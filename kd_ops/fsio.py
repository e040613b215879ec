"""Storage locations: a local path or any `pyarrow.fs` URI (`s3://`, `gs://`, `file://`).

A `Loc` is a (filesystem, path) pair that pickles, so Ray workers on other nodes open the same
object. There is no rename on object storage: `write_bytes` is one PUT there (an object appears
whole or not at all) and tmp-file + rename on a local disk, so a reader never sees half a file.
"""
from __future__ import annotations

import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs


class UnsafePathError(ValueError):
    """A relative path read from a file (a manifest, a commit record) that would leave its directory."""


# user-info up to the last `@` before the path (an unescaped `@` in a password is still masked);
# not anchored, so a URI inside a command line or a message is masked too
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/@:?#\s]*):[^/?#\s]*@")
# query parameters whose names say they hold a secret (token, api_key, access_key, sig, auth, ...)
_SECRET_QUERY = re.compile(r"([?&](?:[^=&#?\s]*(?:secret|token|pass|pwd|key|sig|credential|auth)[^=&#?\s]*)=)"
                           r"[^&#\s]*", re.IGNORECASE)


def redact(uri: str) -> str:
    """`uri` for anything shown or stored: the password of its user-info (any scheme: http,
    postgresql, mysql+pymysql, s3 ...) and the values of secret query parameters (secret_key,
    session_token, api_key, sig, ...) replaced by `***` (`postgresql://user:***@host/db`).
    The URI itself is used unchanged."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1:***@", str(uri)))


def redacted(tree):
    """A JSON-like tree (a config dump, a summary) with every string URI `redact`ed."""
    if isinstance(tree, dict):
        return {k: redacted(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redacted(v) for v in tree]
    return redact(tree) if isinstance(tree, str) and "://" in tree else tree


@dataclass(frozen=True)
class Loc:
    fs: pafs.FileSystem
    path: str
    given: str | None = None  # the URI as the user wrote it (scheme, host, query kept), None for local paths

    @classmethod
    def of(cls, where: "str | Path | Loc") -> "Loc":
        """A Loc from a local path (made absolute) or a URI that pyarrow.fs understands."""
        if isinstance(where, Loc):
            return where
        s = str(where)
        if "://" in s:
            fs, path = pafs.FileSystem.from_uri(s)
            u = urlsplit(s)
            return cls(fs, path.rstrip("/"), urlunsplit((u.scheme, u.netloc, u.path.rstrip("/"), u.query, "")))
        return cls(pafs.LocalFileSystem(), str(Path(s).resolve()))

    @property
    def uri(self) -> str:
        """Where this is, as the user would write it (their URI form, query included; or the local
        path): what `Loc.of` reads back and what MLflow and Ray are given. May hold credentials."""
        return self.given or self.path

    @property
    def bare_uri(self) -> str:
        """scheme://bucket/path without user-info or query (pyarrow options): the form other tools,
        MLflow's artifact stores among them, take; they read endpoints and keys from the environment."""
        if self.given is None:
            return self.path
        u = urlsplit(self.given)
        return urlunsplit((u.scheme, u.netloc.rsplit("@", 1)[-1], u.path, "", ""))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def __truediv__(self, part: str) -> "Loc":
        given = None
        if self.given is not None:
            u = urlsplit(self.given)
            given = urlunsplit((u.scheme, u.netloc, f"{u.path.rstrip('/')}/{part}", u.query, ""))
        return Loc(self.fs, posixpath.join(self.path, part), given)

    def inside(self, relative: str) -> "Loc":
        """`self / relative` for a relative path read from a file (a manifest's `file`, a unit's
        name): UnsafePathError, before anything is opened or deleted, if it is absolute or any
        part is `..` (or empty), so a crafted manifest cannot reach outside this directory."""
        parts = str(relative).split("/")
        if not relative or str(relative).startswith(("/", "\\")) or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise UnsafePathError(f"{relative!r} is not a plain relative path inside {self}; the file naming it "
                                  "was not written by kd-ops or was edited: recompute it")
        return self / relative

    def __str__(self) -> str:
        return redact(self.uri)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Whole or nothing: one PUT on object storage, tmp + rename on a local disk."""
        if not self.local:
            with self.open_output() as f:
                f.write(data)
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{self.path}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.write_bytes(data)
        tmp.replace(self.path)

    def open_output(self):
        """A stream that writes this file directly (parent directories made on a local disk)."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return self.fs.open_output_stream(self.path)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def files(self, suffix: str = "", recursive: bool = False) -> list["Loc"]:
        """Files under this directory whose names end in `suffix`, sorted; [] if it does not exist."""
        sel = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        return [self / i.path[len(self.path) + 1:] for i in sorted(self.fs.get_file_info(sel), key=lambda i: i.path)
                if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size or 0

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)
