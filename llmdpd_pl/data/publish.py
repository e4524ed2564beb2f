"""Publishing Minari datasets, the one way both collections do it (``llmdpd collect``'s scripted
Meta-World data, :mod:`llmdpd_pl.data.sac`'s medium-replay data).

Each dataset is built in a staging folder under the data root (``.staging-<pid>-*``: a dead run's is removed
by the next ``llmdpd collect``), given its ``llmdpd.json`` sidecar with the SHA-256 of its files, and moved
into place by one rename, so it appears complete or not at all. A dataset that another run published
meanwhile is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minari.data_collector import EpisodeBuffer

from llmdpd_pl.data.spec import METADATA_FILE, checksums, minari_datasets_path, staging_folder

#: Who made the datasets, as Minari records it.
AUTHOR = {"author": "llmdpd-pl", "code_permalink": "https://github.com/llmdpd-pl/llmdpd-pl"}


@dataclass(frozen=True)
class NewDataset:
    """One dataset to publish.

    Attributes:
        dataset_id: Minari's id, ``namespace/name-vN``; also its folder under the data root.
        episodes: Its episodes.
        sidecar: ``llmdpd.json`` without ``sha256``, which :func:`publish` adds.
        minari: The other arguments of ``minari.create_dataset_from_buffers`` (``env``, ``description``, ...).
    """

    dataset_id: str
    episodes: Sequence[EpisodeBuffer]
    sidecar: dict[str, Any]
    minari: dict[str, Any] = field(default_factory=dict)


def publish(root: Path, datasets: Sequence[NewDataset]) -> None:
    """Build ``datasets`` in one staging folder under ``root``, then move each into place, in order."""
    import minari

    root.mkdir(parents=True, exist_ok=True)
    staging = staging_folder(root)
    try:
        with minari_datasets_path(staging), warnings.catch_warnings():
            # The project has no contact address beyond its code permalink, which is recorded.
            warnings.filterwarnings("ignore", "`author_email` is set to None", UserWarning)
            for new in datasets:
                minari.create_dataset_from_buffers(dataset_id=new.dataset_id, buffer=list(new.episodes),
                                                   **AUTHOR, **new.minari)  # fmt: skip
                built = staging / new.dataset_id
                sidecar = {**new.sidecar, "sha256": checksums(built)}
                (built / METADATA_FILE).write_text(json.dumps(sidecar, indent=1))
        for ns_file in staging.rglob("namespace_metadata.json"):  # Minari's namespaces, and their folders
            if not (target := root / ns_file.relative_to(staging)).exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(ns_file, target)
        for new in datasets:
            if not (final := root / new.dataset_id).exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging / new.dataset_id, final)  # atomic on one filesystem
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["AUTHOR", "NewDataset", "publish"]
