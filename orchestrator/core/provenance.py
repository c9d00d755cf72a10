"""What a number in a table was made from: the code's commit (and whether the tree had
uncommitted changes), the teacher checkpoint's SHA-256 and the dataset folder read. Every
cell records it: tags of its MLflow run, and `provenance` in its config.json."""
from __future__ import annotations

import functools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str]:
    """{"code.commit": sha or "unknown", "code.dirty": "true"/"false"/"unknown"}."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"code.commit": commit or "unknown",
            "code.dirty": "unknown" if status is None else str(bool(status)).lower()}


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, mtime_ns: int) -> str:
    from orchestrator.core.classifiers import sha256

    return sha256(Path(path))


def cell_provenance(spec) -> dict[str, str]:
    """The provenance tags of one cell (a CellSpec)."""
    teacher = Path(spec.teacher_ckpt)
    sha = _file_sha256(str(teacher), teacher.stat().st_mtime_ns) if teacher.exists() else "missing"
    return {**code_version(), "teacher.sha256": sha, "data.folder": str(spec.data_root or "lookup order")}
