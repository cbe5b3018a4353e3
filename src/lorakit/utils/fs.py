"""Where lorakit may write, and writing there without losing anything (DESIGN principle 14).

The rule, for every command and API call that writes an output (train, sweep, merge, report,
export, save_adapter, save_quantized, ...):

    a folder that does not exist, or is empty              -> write
    a folder holding a lorakit output of the same kind     -> write only with overwrite (a training
                                                              run also with resume), and replace
                                                              only the files lorakit wrote there
    anything else (a folder with other files, another      -> OutputError naming the folder and
    kind of lorakit output, a protected input folder)         what is in it

A lorakit output folder carries a manifest, `lorakit_output.json`:

    {"format": 1, "kind": "merge", "files": ["config.json", "model.safetensors", ...]}

`files` are the paths (relative, "/"-separated) lorakit wrote there; an entry may be an fnmatch
pattern ("checkpoint-*") for folders that grow while a run trains. Nothing else in the folder is
ever touched: a user's notes or scripts next to a merged model survive every overwrite.

Writing is crash-safe: `output_folder` stages the new files in a hidden sibling folder and only
then commits them. Committing a new folder is one rename. Replacing a previous output renames the
staged files into place one by one after writing a commit note; if the process dies during those
renames, the next write to the same folder finds the note and finishes them (roll forward), and a
staging folder without a note (the process died while writing) is discarded, so the previous
output is always either intact or completely replaced. Files and folders get normal permissions
(0666 / 0777 minus the umask: 0644 / 0755 by default), whatever the temporary files had.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional

MANIFEST = "lorakit_output.json"
_FORMAT = 1
_STAGING = ".lorakit-staging-"  # sibling staging folders: .<name>.lorakit-staging-<random>
_COMMIT_NOTE = ".lorakit-commit.json"
KINDS = ("run", "sweep", "merge", "adapter", "quantized", "export")


class OutputError(ValueError):
    """lorakit refuses to write somewhere: the message names the folder and what to do instead."""


# ------------------------------------------------------------------ permissions and fsync


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fix_permissions(path: str | os.PathLike) -> None:
    """Give `path` (and, for a folder, everything under it) the permissions a plain `open`/`mkdir`
    would have: 0666 / 0777 minus the umask. Temporary files and folders start at 0600 / 0700."""
    path, mask = Path(path), _umask()
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            os.chmod(root, 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
    elif path.exists():
        os.chmod(path, 0o666 & ~mask)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Flush every file under `path` (and the folders themselves) to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


# ------------------------------------------------------------------ manifests


def read_manifest(folder: str | os.PathLike) -> Optional[dict]:
    """The folder's lorakit manifest, or None when it has none (or an unreadable one)."""
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "kind" in data else None


def write_manifest(folder: str | os.PathLike, kind: str, files: Iterable[str]) -> None:
    """Write (atomically) the manifest saying `folder` is a lorakit `kind` output owning `files`."""
    if kind not in KINDS:
        raise ValueError(f"output kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    data = {"format": _FORMAT, "kind": kind, "files": sorted(set(files) - {MANIFEST})}
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    fix_permissions(tmp)
    os.replace(tmp, folder / MANIFEST)


def owned(manifest: dict, relpath: str) -> bool:
    """Whether the manifest lists `relpath` (a file, or a folder as a whole) as lorakit's."""
    top = relpath.split("/")[0]
    return any(fnmatch.fnmatchcase(relpath, p) or fnmatch.fnmatchcase(top, p) for p in manifest.get("files", ()))


def _describe(folder: Path, limit: int = 5) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_folder(path: str | os.PathLike, kind: str, overwrite: bool = False, resume: bool = False,
                        protect: Iterable[tuple[str | os.PathLike, str]] = ()) -> Optional[dict]:
    """May lorakit write a `kind` output into `path`? Returns the folder's previous manifest (None
    for a new or empty folder) or raises OutputError naming the folder, what is in it and what the
    caller can do. `protect`: (folder, what) pairs that are inputs of this command, never targets.
    `resume` (a training run or a sweep) allows continuing a previous one without `overwrite`."""
    if kind not in KINDS:
        raise ValueError(f"output kind must be one of {KINDS}, got {kind!r}")
    path = Path(path).expanduser()
    for other, what in protect:
        if other is not None and _same(path, Path(other).expanduser()):
            raise OutputError(f"{path} is {what}; lorakit never writes its output over its own input. "
                              "Choose another output folder")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder; choose a folder for the {kind} output")
    _recover(path)
    if not path.exists() or not any(path.iterdir()):
        return None
    manifest = read_manifest(path)
    if manifest is None:
        raise OutputError(f"{path} is not empty (it holds {_describe(path)}) and is not a lorakit output folder; "
                          f"lorakit writes only into a new or empty folder, so nothing of yours is replaced. "
                          f"Choose a new folder")
    if manifest["kind"] != kind:
        raise OutputError(f"{path} holds a lorakit {manifest['kind']} output, not a {kind} output; "
                          f"choose another folder")
    if overwrite or (resume and kind in ("run", "sweep")):
        return manifest
    hint = "pass --resume to continue it or --overwrite to start again" if kind == "run" else "pass --overwrite"
    raise OutputError(f"{path} already holds a lorakit {kind} output; {hint} (only the files lorakit wrote "
                      f"there are replaced; anything else in the folder stays)")


# ------------------------------------------------------------------ writing a folder


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, kind: str, overwrite: bool = False,
                  protect: Iterable[tuple[str | os.PathLike, str]] = ()) -> Iterator[Path]:
    """Check `path` (check_output_folder), yield an empty staging folder to write the output into,
    and on success make it the output: `path` then holds exactly the staged files plus whatever of
    someone else's was there, and a manifest listing the staged files. On an exception nothing
    changes."""
    path = Path(path).expanduser()
    previous = check_output_folder(path, kind, overwrite, protect=protect)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}{_STAGING}", dir=path.parent))
    try:
        yield staging
        files = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file()]
        write_manifest(staging, kind, files)
        fix_permissions(staging)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if not path.exists():
        os.replace(staging, path)
    elif previous is None and not any(path.iterdir()):
        os.rmdir(path)  # an empty folder: replace it by the staging folder in one rename
        os.replace(staging, path)
    else:
        _commit(staging, path, previous or {"files": []})
    _fsync_dir(path.parent)


def _commit(staging: Path, path: Path, previous: dict) -> None:
    """Move the staged files over the previous output: write the commit note (the point of no
    return), move each staged file into place, delete the previous output's files that the new
    one does not have (and only those), then drop the staging folder."""
    moves = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*")
                   if p.is_file() and p.name != _COMMIT_NOTE)
    stale = sorted(rel for rel in _files_under(path) if owned(previous, rel) and rel not in moves)
    note = staging / _COMMIT_NOTE
    note.write_text(json.dumps({"target": path.name, "moves": moves, "stale": stale}) + "\n", encoding="utf-8")
    with open(note, "rb") as f:
        os.fsync(f.fileno())
    _finish_commit(staging, path)


def _finish_commit(staging: Path, path: Path) -> None:
    note = json.loads((staging / _COMMIT_NOTE).read_text(encoding="utf-8"))
    moves = [m for m in note["moves"] if m != MANIFEST] + [MANIFEST]  # the manifest last
    for rel in moves:
        src = staging / rel
        if src.exists():  # a roll-forward after a crash finds some already moved
            dst = path / rel
            if dst.is_dir() and not src.is_dir():
                shutil.rmtree(dst)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    for rel in note["stale"]:
        stale = path / rel
        if stale.is_file() or stale.is_symlink():
            stale.unlink()
    for rel in sorted({str(Path(r).parent) for r in note["stale"]}, key=len, reverse=True):
        folder = path / rel
        if rel != "." and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for folder in {path / Path(rel).parent for rel in moves}:
        _fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)


def _files_under(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()]


def _recover(path: Path) -> None:
    """Finish (roll forward) or discard staging folders a killed process left beside `path`."""
    parent = path.parent
    if not parent.is_dir():
        return
    for staging in parent.glob(f".{glob_escape(path.name)}{_STAGING}*"):
        if (staging / _COMMIT_NOTE).is_file() and path.is_dir():
            _finish_commit(staging, path)
        else:
            shutil.rmtree(staging, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


# ------------------------------------------------------------------ long-lived folders (training runs)


def claim_folder(path: str | os.PathLike, kind: str, owns: Iterable[str], overwrite: bool = False,
                 resume: bool = False) -> Path:
    """Make `path` a lorakit `kind` folder that a long job fills as it goes (a training run, a sweep):
    checked as `check_output_folder`; with `overwrite` (and not `resume`) the previous output's files
    are removed first (only those its manifest lists); then the manifest says it owns `owns`
    (names or patterns). Returns the folder."""
    path = Path(path).expanduser()
    previous = check_output_folder(path, kind, overwrite, resume)
    if previous is not None and overwrite and not resume:
        remove_owned(path, previous)
    path.mkdir(parents=True, exist_ok=True)
    merged = set(owns) | (set(previous.get("files", ())) if previous is not None and resume else set())
    write_manifest(path, kind, merged)
    return path


def remove_owned(path: str | os.PathLike, manifest: Optional[dict] = None) -> None:
    """Delete what lorakit wrote in `path` (the entries its manifest lists, then the manifest), and
    the folder itself if nothing else is left. A folder without a manifest is an OutputError."""
    path = Path(path)
    manifest = manifest or read_manifest(path)
    if manifest is None:
        raise OutputError(f"{path} is not a lorakit output folder (no {MANIFEST}); lorakit deletes only what it wrote")
    for entry in sorted(path.iterdir()):
        if entry.name == MANIFEST or not owned(manifest, entry.name):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    (path / MANIFEST).unlink(missing_ok=True)
    if not any(path.iterdir()):
        path.rmdir()


# ------------------------------------------------------------------ lorakit's own sub-folders and files


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success fsync it and rename it into place,
    replacing a previous `final` as a whole. Only for folders lorakit alone owns (a checkpoint
    inside a run folder); outputs a user names go through `output_folder`.

    A crash (or exception) inside the block leaves `final` as it was: the temporary folder is
    removed on exceptions, and one left by a killed process is never read (it is not named
    `final`). An existing `final` is replaced only after the new one is complete on disk.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        fix_permissions(tmp)
        fsync_tree(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `final`; on success it replaces `final` in one rename (a
    reader sees the old file or the new one, never half of one), with normal permissions."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fix_permissions(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(path: str | os.PathLike, what: str, overwrite: bool, ours) -> Path:
    """May lorakit write the single file `path` (a report, a GGUF)? A new file yes; an existing one
    only with `overwrite` and when `ours(path)` says lorakit wrote it. Returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name for the {what}")
    if not path.exists():
        return path
    if not ours(path):
        raise OutputError(f"{path} exists and was not written by lorakit; lorakit never replaces a file it did "
                          f"not write. Choose another file name for the {what}")
    if not overwrite:
        raise OutputError(f"{path} already holds a lorakit {what}; pass --overwrite to replace it")
    return path
