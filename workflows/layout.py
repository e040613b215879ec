"""Where a run keeps things under --out."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kd_ops.fsio import Loc
from workflows.config import TeacherConfig


@dataclass
class Layout:
    """Where a run keeps things under --out: a local path or any pyarrow.fs URI (s3://, gs://)."""
    out: Loc

    def __post_init__(self):
        self.out = Loc.of(self.out)

    @property
    def data(self) -> Loc: return self.out / "data"
    @property
    def teachers(self) -> Loc: return self.out / "teachers"
    @property
    def store(self) -> Loc: return self.out / "store"
    @property
    def ray(self) -> Loc: return self.out / "ray"

    def make(self) -> None:
        """Create --out, or one clear error (a path under a regular file, a file, no permission)."""
        try:
            if self.out.is_file():
                raise ValueError(f"--out {self.out} is a file; give a directory (it is created if missing)")
            self.out.mkdir()
        except OSError as e:
            raise ValueError(f"--out {self.out}: cannot create the directory ({e.strerror or e}); give a "
                             "directory that can be created") from None

    def local(self, what: str) -> Path:
        """--out as a local directory, for the parts that need one (Hugging Face directories)."""
        if not self.out.local:
            raise ValueError(f"{what} needs a local --out for now (got {self.out}); the store, checkpoints and "
                             "summary of classification runs can live on object storage")
        return Path(self.out.path)

    def teacher_weights(self, t: TeacherConfig) -> str | Loc:
        """A classification teacher's weights: the file the config names, or where `kd run` keeps
        the ones it trains."""
        return t.weights or self.teachers / f"{t.name}.safetensors"

    def teacher_key(self, t: TeacherConfig) -> Loc:
        """What the teacher `kd run` trained into `teacher_weights` is keyed by (workflows.fingerprints)."""
        return self.teachers / f"{t.name}.key.json"
