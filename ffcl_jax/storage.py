"""Every path the project reads or writes, local or on Cloud Storage (`gs://`), as `epath.Path`.

etils.epath (the path library of orbax and the Flax examples) serves `gs://` through
`tf.io.gfile` when TensorFlow is installed and through fsspec's gcsfs otherwise (or with
`EPATH_USE_TF=false`); orbax writes checkpoint arrays through tensorstore's own GCS client. So a
workdir on a bucket works on every host of a pod slice, and local paths work as before.

Cloud Storage has no folders and no appends: a "folder" exists once an object lies under it, a
rename is a copy and a delete, and an appended file is rewritten whole (`append_text`).
"""

from __future__ import annotations

import os
import sys

from etils import epath

from ffcl_jax.errors import UserError


def path(location: str | os.PathLike) -> epath.Path:
    """`location` as a path: URIs (`gs://bucket/run`) as given, local paths made absolute (so
    that messages name them fully and a later `chdir` cannot move them)."""
    text = os.fspath(location)
    if is_remote(text):
        return epath.Path(text)
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def is_remote(location: str | os.PathLike) -> bool:
    return "://" in os.fspath(location)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = (text.splitlines()[0] if text else "") or type(exc).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def bucket_of(location: str | os.PathLike) -> epath.Path | None:
    """`gs://bucket` of a `gs://bucket/...` path (None for local paths)."""
    text = os.fspath(location)
    if not is_remote(text):
        return None
    scheme, rest = text.split("://", 1)
    return epath.Path(f"{scheme}://{rest.split('/', 1)[0]}")


def prepare_workdir(workdir: epath.Path, process_index: int = 0) -> None:
    """Makes a local workdir (a bucket's is implicit), then writes and deletes one small file in
    it, so that a path this process cannot write fails now, with one line, before anything runs.
    Every process of a multi-host run checks with its own file name (its own credentials)."""
    bucket = bucket_of(workdir)
    try:
        if bucket is not None and not bucket.exists():
            raise UserError(
                f"bucket {bucket} of --workdir={workdir} does not exist or this machine's "
                f"credentials cannot see it: create it (`gcloud storage buckets create {bucket}`) "
                "or fix the path"
            )
        if bucket is None:
            workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_check_{process_index}"
        probe.write_text("ffcl_jax checks that it can write here\n")
        probe.unlink()
    except UserError:
        raise
    except Exception as exc:  # OSError locally; each GCS client raises its own types
        raise UserError(
            f"cannot write to --workdir={workdir} ({first_line(exc)}): give a folder or bucket "
            "path this process may write to (nothing was written)"
        ) from exc


def write_text(target: epath.Path, text: str) -> None:
    """Writes `target` whole through a temporary file and a rename, so a reader (or a run killed
    meanwhile) sees the old content or the new, never half of it."""
    tmp = target.parent / (target.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(target)


def append_text(target: epath.Path, text: str, whole: str) -> None:
    """Appends `text` to `target`. Cloud Storage objects cannot grow, so there the file is
    rewritten as `whole` (the caller's full content, `text` included)."""
    if is_remote(target):
        target.write_text(whole)
    else:
        with open(os.fspath(target), "a") as f:
            f.write(text)


def tree_size(top: epath.Path) -> int:
    """Bytes of every file under `top` (epath's `glob('**')` is refused on GCS)."""
    return sum((folder / name).stat().length for folder, _, names in top.walk() for name in names)


def forget_cached_listings(location: str | os.PathLike) -> None:
    """gcsfs caches folder listings in each process, so what another process changed (process 0
    of a multi-host run moving a run aside) is seen only after this."""
    if is_remote(location) and "gcsfs" in sys.modules:  # TensorFlow's client keeps no listings
        from etils.epath import backend

        backend.fsspec_backend.fs(os.fspath(location)).invalidate_cache()
