"""Logging setup shared by the CLI and the workflow's scripts."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence


def setup(log_files: Sequence[str] = (), *, threads: int | None = None) -> None:
    """Log at INFO to stderr, or append stderr (tqdm bars included) to the first of ``log_files``;
    with ``threads``, cap torch's intra-op threads to the job's share of the cores (parallel
    jobs that each use every core slow each other down many times over)."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    if log_files:
        sys.stderr = open(log_files[0], "a", buffering=1)  # noqa: SIM115 (lives as long as the job)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        force=True,
    )
