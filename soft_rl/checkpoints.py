"""Checkpoint directories: a manifest written last, and the newest complete checkpoint found again.

``LearnerGroup.save_checkpoint`` writes ``root/.tmp-step-N``, adds ``manifest.json`` (every file with its
size) and renames the directory to ``root/step-N``. A directory that lacks the manifest, misses a file or
holds one of another size (a copy cut short, a full disk, a hand edit) is *incomplete*: ``usable_checkpoints``
skips it with a warning naming it, so ``--resume`` and a learner rebuild take the newest complete one.
"""

from __future__ import annotations

import json
from pathlib import Path

MANIFEST = "manifest.json"


def write_manifest(ckpt_dir: Path, step: int) -> None:
    files = {str(p.relative_to(ckpt_dir)): p.stat().st_size for p in sorted(ckpt_dir.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (ckpt_dir / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))


def checkpoint_problem(ckpt_dir: Path) -> str | None:
    """Why ``ckpt_dir`` cannot be loaded, or None when it is complete."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the checkpoint was not finished)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST}: {e}"
    if not files:
        return f"{MANIFEST} lists no files"
    for name, size in files.items():
        p = ckpt_dir / name
        if not p.is_file():
            return f"missing {name}"
        if p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {size}"
    return None


def checkpoint_step(ckpt_dir: Path) -> int:
    return int(ckpt_dir.name.split("-", 1)[1])


def usable_checkpoints(root: Path, log=print) -> list[Path]:
    """Complete ``root/step-*`` directories, newest first; each incomplete one is skipped with a warning."""
    found = []
    for d in sorted(Path(root).glob("step-*"), reverse=True):
        if not d.is_dir() or not d.name.split("-", 1)[1].isdigit():
            continue
        problem = checkpoint_problem(d)
        if problem is None:
            found.append(d)
        else:
            log(f"[train] WARNING: skipping checkpoint {d}: {problem}")
    return found


def latest_checkpoint(root: Path, log=print) -> Path | None:
    found = usable_checkpoints(root, log)
    return found[0] if found else None
