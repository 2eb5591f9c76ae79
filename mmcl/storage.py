"""The study's storage: the one place that turns ``storage:`` into files.

``storage:`` (and ``--output``, ``mmcl resume``, ``mmcl report``, ``analysis.load``) is
either a local / NFS directory or a URI that pyarrow's filesystem layer resolves:
``s3://bucket/prefix``, ``gs://bucket/prefix``, and for S3-compatible servers
``s3://bucket/prefix?endpoint_override=host:port&scheme=http`` (pyarrow's S3 options).
Credentials come from the environment of each process (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, an instance role, ``GOOGLE_APPLICATION_CREDENTIALS``), never
from the study file.

pyarrow.fs rather than fsspec: pyarrow is already what reads and writes the Parquet
tables and what Ray Tune's ``storage_path`` / ``storage_filesystem`` take, so trials,
the driver and Tune's checkpoints go through the same filesystem object and the same
URI grammar; fsspec would add a second client (s3fs) with its own credential chain.

Atomic writes: on a local disk a file is written to a temporary name and renamed into
place. Object stores have no rename, but an object becomes visible only when its upload
completes (S3 PutObject / CompleteMultipartUpload), so a reader never sees half a file
there either. Every results file has a write-once key fixed by what it holds
(``parts/accuracy/<stage>/<trial>/step_003.parquet``): a retry rewrites the same key
with the same rows, so neither medium can lose or duplicate a row (mmcl.results).
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow.fs as pafs

class StorageError(ValueError):
    """A storage location that cannot be used (bad URI, no access): message names it."""


def is_uri(where: str | Path) -> bool:
    """True for ``scheme://...`` other than ``file://`` (and never for a Windows drive)."""
    text = str(where)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1 and scheme != "file"


class Storage:
    """A directory on a local disk or in an object store, addressed by relative keys.

    ``Storage.open("s3://b/studies?endpoint_override=...")`` / ``Storage.open("results")``;
    ``storage / "quickstart"`` is the study's own directory. Keys are POSIX-style
    (``"parts/trials/search.parquet"``) whatever the medium.
    """

    def __init__(self, fs: pafs.FileSystem, root: str, uri: str, local: bool):
        self.fs = fs
        self.root = root.rstrip("/") or "/"  # the filesystem's own path (no scheme)
        self.uri = uri  # what a user would pass again to reach the same place
        self.local = local

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(cls, where: str | Path, cwd: Path | None = None) -> Storage:
        import pyarrow.fs as pafs

        text = str(where).strip()
        if not text:
            raise StorageError("storage: empty location; fix: a directory or a URI such as s3://bucket/prefix")
        if is_uri(text):
            try:
                fs, path = pafs.FileSystem.from_uri(text)
            except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ValueError
                raise StorageError(
                    f"storage: cannot use {text!r}: {e}; fix: s3://bucket/prefix (options as "
                    "?endpoint_override=host:port&scheme=http for an S3-compatible server) or a local path"
                ) from None
            parts = urlsplit(text)
            query = f"?{parts.query}" if parts.query else ""
            uri = f"{parts.scheme}://{path.rstrip('/')}{query}"
            return cls(fs, path, uri, local=False)
        if text.startswith("file://"):
            text = text[len("file://") :]
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = (cwd or Path.cwd()) / path
        path = Path(os.path.normpath(path))
        return cls(pafs.LocalFileSystem(), str(path), str(path), local=True)

    def __truediv__(self, key: str) -> Storage:
        key = key.strip("/")
        root = posixpath.join(self.root, key)
        if self.local:
            return Storage(self.fs, root, root, True)
        base, _, query = self.uri.partition("?")
        uri = f"{base.rstrip('/')}/{key}" + (f"?{query}" if query else "")
        return Storage(self.fs, root, uri, False)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ paths

    def path(self, key: str = "") -> str:
        """The filesystem path of ``key`` (for pyarrow / Ray Tune calls)."""
        return posixpath.join(self.root, key.strip("/")) if key else self.root

    def where(self, key: str = "") -> str:
        """``key`` as a user would name it in a message (URI or local path)."""
        if self.local:
            return self.path(key)
        base, _, query = self.uri.partition("?")
        return f"{base}/{key}".rstrip("/") if key else base

    @property
    def local_path(self) -> Path | None:
        """The directory as a ``Path`` when it is on a local (or NFS) disk, else None."""
        return Path(self.root) if self.local else None

    def cache_key(self) -> str:
        """A short stable name of this location (for driver-side mirrors of its files)."""
        return hashlib.sha256(self.uri.encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ reading

    def exists(self, key: str = "") -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(key)).type != pafs.FileType.NotFound

    def is_file(self, key: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(key)).type == pafs.FileType.File

    def read_bytes(self, key: str) -> bytes:
        with self.fs.open_input_stream(self.path(key)) as f:
            return f.read()

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def list_files(self, prefix: str = "", suffix: str = "") -> list[str]:
        """Keys (relative to this directory) of every file under ``prefix``, sorted.
        Names starting with "." (temporary files of an unfinished local write) are left out."""
        import pyarrow.fs as pafs

        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        base = self.root.rstrip("/") + "/"
        keys = []
        for info in self.fs.get_file_info(sel):
            if info.type != pafs.FileType.File or info.base_name.startswith("."):
                continue
            if not info.path.endswith(suffix):
                continue
            keys.append(info.path[len(base) :] if info.path.startswith(base) else info.path)
        return sorted(keys)

    def read_parquet(self, key: str) -> pd.DataFrame:
        import pyarrow.parquet as pq

        return pq.read_table(self.path(key), filesystem=self.fs).to_pandas()

    # ------------------------------------------------------------------ writing

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write ``key`` whole or not at all (see the module docstring)."""
        path = self.path(key)
        if self.local:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        # Object stores: one upload; the object appears only once it is complete.
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def write_parquet(self, df: pd.DataFrame, key: str) -> None:
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        self.write_bytes(key, buf.getvalue())

    def upload_file(self, local: Path, key: str) -> None:
        self.write_bytes(key, Path(local).read_bytes())

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:
            pass

    def check_writable(self) -> None:
        """Write and delete a probe file: a clear error now instead of in every trial."""
        probe = f".write-test-{os.getpid()}"
        try:
            if self.local:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            self.write_bytes(probe, b"")
            self.delete(probe)
        except OSError as e:
            raise StorageError(
                f"storage: cannot write {self.where()} ({getattr(e, 'strerror', None) or e}); fix: set `storage:` "
                "in the study (or --output) to a directory or bucket this machine can write (for a bucket: "
                "credentials in the environment, e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            ) from None


def open_storage(where: str | Path | Storage, cwd: Path | None = None) -> Storage:
    """``where`` as a :class:`Storage` (passing one through unchanged)."""
    return where if isinstance(where, Storage) else Storage.open(where, cwd)
