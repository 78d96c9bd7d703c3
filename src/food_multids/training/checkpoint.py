"""Periodic DeepSpeed checkpoints and the best model directory, both safe against a kill mid-write.

Layout under training.output_dir:
  checkpoints/step-00000040/        DeepSpeed checkpoint (all ranks write) + COMPLETE.json (rank 0, last,
                                    with the SHA-256 of every file, checked before a resume loads them)
  best/step-00000040/               classifier directory (save_pretrained), written to a temp dir, fsynced, renamed:
                                    the best model and the other candidates kept for the full-set re-rank
  best.json                         pointer to the current best and the candidates, replaced atomically (os.replace)
A checkpoint without COMPLETE.json, or a best directory without the pointer, is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from food_multids.runtime.files import fsync_tree, write_json_atomic

COMPLETE = "COMPLETE.json"
BEST_POINTER = "best.json"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint whose COMPLETE marker exists, oldest first."""
    root = output_dir / "checkpoints"
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        marker = path / COMPLETE
        if marker.is_file():
            found.append((json.loads(marker.read_text())["step"], path))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    done = complete_checkpoints(output_dir)
    return done[-1][1] if done else None


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint's files differ from the SHA-256 sums recorded when it was written."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_sums(path: Path) -> dict[str, str]:
    """SHA-256 of every file under a checkpoint folder (hashlib releases the GIL: files in parallel)."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)
    with ThreadPoolExecutor(max_workers=4) as pool:
        sums = list(pool.map(_sha256, files))
    return {p.relative_to(path).as_posix(): s for p, s in zip(files, sums, strict=True)}


def mark_complete(path: Path, step: int, extra: dict) -> None:
    """Seal a checkpoint: fsync its files, then write COMPLETE.json with their SHA-256 sums."""
    fsync_tree(path)
    write_json_atomic(path / COMPLETE, {"step": step, **extra, "sha256": checkpoint_sums(path)})


def verify_checkpoint(path: Path) -> None:
    """Check every file against COMPLETE.json before DeepSpeed loads it.

    Resuming runs torch.load(weights_only=False) inside DeepSpeed, which can execute code from a
    crafted file: only files written by this run's own save, byte for byte, are loaded.
    """
    recorded = json.loads((path / COMPLETE).read_text()).get("sha256")
    if recorded is None:
        raise CheckpointIntegrityError(f"{path / COMPLETE} has no SHA-256 sums (written by an older version): this "
                                       "checkpoint cannot be verified; resume with the version that wrote it, or set "
                                       "training.overwrite_output_dir: true to start fresh")
    actual = checkpoint_sums(path)
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            raise CheckpointIntegrityError(f"checkpoint file {path / name} is missing (listed in {COMPLETE})")
        if name not in recorded:
            raise CheckpointIntegrityError(f"checkpoint file {path / name} was not written by the run "
                                           f"(not in {COMPLETE}): remove it if you trust it")
        if actual[name] != recorded[name]:
            raise CheckpointIntegrityError(f"checkpoint file {path / name} has changed since it was written "
                                           f"(SHA-256 {actual[name][:12]}..., recorded {recorded[name][:12]}...)")


def prune_checkpoints(output_dir: Path, limit: int | None, keep_step: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints beyond `limit`, never the newest (resume needs it) nor the
    one at `keep_step` (the best; so limit + 1 can remain, as in Hugging Face's Trainer), and any
    incomplete leftovers older than the newest complete one."""
    done = complete_checkpoints(output_dir)
    removed = []
    if limit is not None:
        extra = len(done) - limit
        for step, path in done[:-1]:
            if extra <= 0:
                break
            if step == keep_step:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            extra -= 1
    if done:
        newest = done[-1][0]
        for path in (output_dir / "checkpoints").glob("step-*"):
            if not (path / COMPLETE).is_file() and int(path.name.split("-")[1]) < newest:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def read_best_pointer(output_dir: Path) -> dict | None:
    pointer = output_dir / BEST_POINTER
    return json.loads(pointer.read_text()) if pointer.is_file() else None


def publish_best(output_dir: Path, staged: Path, step: int, best: dict, candidates: list[dict]) -> Path:
    """Move a fully written model directory into best/<tag of step>, point best.json at the best model and
    the candidates kept for the re-rank (each with its path), then drop every other folder under best/.

    A kill between the steps leaves either the previous pointer (and one unreferenced folder, dropped by
    the next publish) or the new one: a pointer never names a folder that is not whole.
    """
    fsync_tree(staged)
    root = output_dir / "best"
    final = root / step_tag(step)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staged, final)
    listed = [{**c, "path": str(root / step_tag(c["step"]))} for c in candidates]
    write_json_atomic(output_dir / BEST_POINTER, {**best, "path": str(root / step_tag(best["step"])),
                                                  "candidates": listed})
    keep = {Path(c["path"]) for c in listed} | {root / step_tag(best["step"])}
    for other in root.iterdir():
        if other not in keep:
            shutil.rmtree(other, ignore_errors=True)
    return final
