"""An offline text corpus: the Python standard library's own source.

Files are split deterministically into a calibration part and a held-out
evaluation part (by a hash of the relative path), so evaluation contexts are
never seen during calibration.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(relative: str) -> bool:
    return hashlib.sha256(relative.encode()).digest()[0] % 4 == 0


def corpus_files(split: str, root: Path | None = None) -> list[Path]:
    """Sorted .py files of the stdlib (no tests, no site-packages) for a split."""
    if split not in ("calibration", "eval"):
        raise ValueError(f"split must be 'calibration' or 'eval', got {split!r}")
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in relative:
            continue
        if _is_heldout(relative) == (split == "eval"):
            files.append(path)
    return files


def token_sequences(tokenizer, split: str, length: int, count: int,
                    min_file_tokens: int | None = None) -> Iterator[list[int]]:
    """Up to ``count`` token sequences of exactly ``length`` tokens, each from
    the start of a different file (long enough files only), BOS-prefixed when
    the tokenizer has one."""
    produced = 0
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    need = min_file_tokens or length
    for path in corpus_files(split):
        text = path.read_text(encoding="utf-8", errors="replace")
        if len(text) < need:  # characters >= tokens for code
            continue
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            continue
        yield ids[:length]
        produced += 1
        if produced >= count:
            return
