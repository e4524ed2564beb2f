"""Small general helpers: seeds, atomic file writes, progress bars, cached compilation, gradient clipping.

Nothing here imports the rest of the package, so any layer can use it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

F = TypeVar("F", bound=Callable[..., Any])

#: Seconds between progress-bar refreshes: live on a terminal, every 10 s in a log file.
PROGRESS_INTERVAL = 0.1 if sys.stderr.isatty() else 10.0


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def umask() -> int:
    """The process's umask (read by setting it and setting it back: there is no getter)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place; return the path.

    Readers see the old file or the new one, never a partial one, and a failed write leaves no file behind.
    The file gets the mode a plain ``open`` would give it (0666 less the umask), not ``mkstemp``'s 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


SOURCE_ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the package: a git checkout's top level when the package is installed from one."""


def git_commit(root: str | Path = SOURCE_ROOT) -> str | None:
    """The commit of the git checkout whose top level is ``root``, with ``+dirty`` for uncommitted changes
    to tracked files; None without git or outside such a checkout."""
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        except OSError:  # no git
            return ""
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit or Path(git("rev-parse", "--show-toplevel")).resolve() != Path(root).resolve():
        return None
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn)


def maybe_compiled(fn: F, compile: bool) -> F:
    """``torch.compile(fn)`` if ``compile``, else ``fn``. The compiled wrapper is made once per function."""
    return _compiled(fn) if compile else fn  # type: ignore[return-value]


def clip_grad_norms(groups: Mapping[str, Iterable[nn.Parameter]], max_norm: float) -> dict[str, Tensor]:
    """Clip the joint gradient L2 norm of all groups to ``max_norm``; return each group's norm and the total.

    ``total = sqrt(Σ_g ||∇_g||²)``; every gradient is scaled by ``min(1, max_norm / (total + 1e-6))``.
    ``max_norm <= 0`` measures without clipping. On the CPU, where reading the factor needs no device
    sync, a factor of exactly 1 skips the multiply (x · 1 = x): the actor's gradients are almost never
    clipped, and that multiply costs a few percent of an update (``docs/performance.md``).
    """
    norms: dict[str, Tensor] = {}
    grads: list[Tensor] = []
    for name, params in groups.items():
        g = [p.grad for p in params if p.grad is not None]
        if g:
            norms[name] = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)))
            grads += g
    total = torch.linalg.vector_norm(torch.stack(list(norms.values())))
    if max_norm > 0:
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        if scale.device.type != "cpu" or scale.item() != 1.0:  # NaN != 1: a NaN total still spreads
            torch._foreach_mul_(grads, scale)
    return {**norms, "total": total}
