"""Append-only JSONL metrics that stay consistent across resumes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """On resume, records past the checkpoint's step are dropped: those steps are trained (and logged) again."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
