"""Storage locations: a local path or any `pyarrow.fs` URI (`s3://`, `gs://`, `file://`).

A `Loc` is a (filesystem, path) pair that pickles, so Ray workers on other nodes open the same
object. There is no rename on object storage: `write_bytes` is one PUT there (an object appears
whole or not at all) and tmp-file + rename on a local disk, so a reader never sees half a file.
"""
from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs


@dataclass(frozen=True)
class Loc:
    fs: pafs.FileSystem
    path: str

    @classmethod
    def of(cls, where: "str | Path | Loc") -> "Loc":
        """A Loc from a local path (made absolute) or a URI that pyarrow.fs understands."""
        if isinstance(where, Loc):
            return where
        s = str(where)
        if "://" in s:
            fs, path = pafs.FileSystem.from_uri(s)
            return cls(fs, path.rstrip("/"))
        return cls(pafs.LocalFileSystem(), str(Path(s).resolve()))

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def __truediv__(self, part: str) -> "Loc":
        return Loc(self.fs, posixpath.join(self.path, part))

    def __str__(self) -> str:
        return self.path if self.local else f"{self.fs.type_name}://{self.path}"

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
        return [Loc(self.fs, i.path) for i in sorted(self.fs.get_file_info(sel), key=lambda i: i.path)
                if i.type == pafs.FileType.File and i.base_name.endswith(suffix)]

    def size(self) -> int:
        return self.fs.get_file_info(self.path).size or 0

    def delete(self) -> None:
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)
