"""The manifest: a table with one row per image, stored as Parquet (pyarrow) or JSON lines.

Rows are dicts; every row has the same keys (missing values are None). Writes are atomic (a temporary file
in the same folder, then `os.replace`), so an interrupted step leaves the last complete manifest behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SUFFIXES = (".parquet", ".jsonl")


def check_manifest_path(path: Path, what: str = "manifest") -> Path:
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{what} {path} must end in .parquet or .jsonl")
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder")
    return path


def read_manifest(path: Path) -> list[dict]:
    path = check_manifest_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (run `ernielab data scan` first)")
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable Parquet manifest ({' '.join(str(e).split())})") from None
    else:
        from ernielab.worlds.folder import jsonl_objects

        rows = [row for _, row in jsonl_objects(path)]
    for i, row in enumerate(rows):
        if not isinstance(row.get("path"), str) or row.get("id") != i:
            raise ValueError(f"{path}: row {i} is not a manifest row (needs 'id' = {i} and a 'path'); "
                             f"was it written by `ernielab data scan`?")
    return rows


def _columns(rows: list[dict]) -> list[str]:
    keys: dict[str, None] = {}
    for row in rows:
        keys.update(dict.fromkeys(row))
    return list(keys)


def write_manifest(rows: list[dict], path: Path) -> Path:
    """Write atomically; rows get every column (None where missing)."""
    path = check_manifest_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = _columns(rows)
    rows = [{k: row.get(k) for k in columns} for row in rows]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pylist(rows) if rows else pa.table({"id": pa.array([], pa.int64()),
                                                                     "path": pa.array([], pa.string())})
            pq.write_table(table, tmp)
        else:
            with tmp.open("w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
