"""What every `ernielab` command shares: the error contract (one `error: ...` line, exit 2), config files with
`--set KEY=VALUE` overrides, prompt files, sizes and the thread count."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import typer


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


def user_errors(fn):
    """Expected failures (bad files, configs, shapes, paths) become one `error: ...` line and exit code 2."""
    from safetensors import SafetensorError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, OSError, ValueError, SafetensorError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _nearest_existing(path: Path) -> Path:
    """The path itself or its closest existing ancestor; a file on the way there is an error."""
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def check_output_dir(path: Path, what: str = "output folder") -> None:
    """`path` can be created (or is a folder) and written, checked without leaving anything behind."""
    import tempfile

    path = Path(path)
    existing = _nearest_existing(path.absolute())
    if not existing.is_dir():
        raise UserError(f"{what} {path}: {existing} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"{what} {path} cannot be written: {e.strerror or e}") from None


def check_output_file(path: Path, suffixes: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")) -> None:
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise UserError(f"output file {path} must end in one of {', '.join(suffixes)}")
    if path.is_dir():
        raise UserError(f"output file {path} is a folder")
    check_output_dir(path.parent, "folder of output file")


def parse_value(raw: str):
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _field_kind(cls, parents: list[str], leaf: str):
    """The declared type of a dotted config field, or None past the configs (inside a dict field)."""
    import dataclasses
    import typing

    from ernielab.core.config import Config

    kind = cls
    for name in [*parents, leaf]:
        if not (isinstance(kind, type) and issubclass(kind, Config)):
            return None
        fields = {f.name for f in dataclasses.fields(kind)}
        if name not in fields:
            raise UserError(f"--set {'.'.join([*parents, leaf])}: {kind.__name__} has no field {name!r}")
        kind = typing.get_type_hints(kind)[name]
    return kind


def parse_sets(pairs: list[str], cls=None) -> dict:
    """['model.num_layers=4', 'lr=1e-3'] -> {'model': {'num_layers': 4}, 'lr': 0.001}. Values are parsed as
    JSON, except for text fields of `cls` (so `--set output_dir=2024` stays the text "2024")."""
    out: dict = {}
    for pair in pairs:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise UserError(f"--set {pair!r} is not KEY=VALUE")
        *parents, leaf = key.split(".")
        kind = _field_kind(cls, parents, leaf) if cls is not None else None
        node = out
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UserError(f"--set {pair!r} conflicts with another --set of {p}")
        node[leaf] = raw if kind in (str, str | None) else parse_value(raw)
    return out


def deep_merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for k, v in extra.items():
        merged[k] = deep_merge(merged[k], v) if isinstance(v, dict) and isinstance(merged.get(k), dict) else v
    return merged


def load_config(cls, path, overrides: list[str] = ()):
    """A Config subclass from a JSON file plus `--set KEY=VALUE` overrides; every problem is one UserError
    naming the file and the field."""
    from ernielab.core.config import ConfigError, read_json_object

    path = Path(path)
    data = read_json_object(path)
    merged = deep_merge(data, parse_sets(list(overrides), cls))
    try:
        return cls.from_dict(merged)
    except ConfigError as e:
        raise UserError(f"config file {path}{' with --set' if overrides else ''}: {e}") from None


def run_options(cfg, output_dir: str | None, fresh: bool):
    """Apply the training commands' `--output-dir` and `--fresh` (start over instead of resuming)."""
    if output_dir:
        cfg = cfg.replace(output_dir=output_dir)
    return cfg.replace(resume="") if fresh else cfg


def add_train_command(app: typer.Typer, config_cls, run, what: str, name: str = "train", prepare=None) -> None:
    """The one training command every family has: `ernielab <family> train CONFIG.json [--set key=value ...]
    [--output-dir DIR] [--fresh] [--threads N]`. `config_cls`: the config class, or "module:Class" to import it
    only when the command runs (keeps `--help` fast); `prepare(config)`, if given, turns the loaded config into
    the training config (e.g. a stage-2 config into its run); `run(config)` trains through the engine and
    returns its result dict. `name` names other training commands of a family (e.g. `unified vq`)."""

    @app.command(name, help=f"Train {what} from a JSON config (resumes from the run folder's latest checkpoint).")
    @user_errors
    def train(config: Path = typer.Argument(..., help="training config JSON (see configs/)"),
              set_: list[str] = typer.Option([], "--set", help="override a config field, e.g. --set steps=100"),
              output_dir: Optional[str] = typer.Option(None, "--output-dir", help="override output_dir"),
              fresh: bool = typer.Option(False, "--fresh", help="clear the run folder's checkpoints and start over"),
              threads: int = typer.Option(0, help="torch CPU threads (0 = torch's default)")):
        cls = config_cls
        if isinstance(cls, str):
            import importlib

            module, attr = cls.split(":")
            cls = getattr(importlib.import_module(module), attr)
        cfg = load_config(cls, config, set_)
        cfg = run_options(prepare(cfg) if prepare else cfg, output_dir, fresh)
        check_output_dir(Path(cfg.output_dir), "output_dir")
        set_threads(threads)
        result = run(cfg)
        typer.echo(train_summary(result))
        if result.get("eval"):
            typer.echo(json.dumps(result["eval"], default=float))


def train_summary(result: dict) -> str:
    line = f"trained to step {result['step']} in {result['elapsed_s']:.0f}s"
    if result.get("stopped"):
        return f"{line}; stopped: {result['stopped']}; nothing exported (run the same command again to resume)"
    return f"{line}; exported to {result['exported']}" if result.get("exported") else line


def set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def read_prompts(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"prompt file not found: {path}") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompt file {path}: {e}") from None
    prompts = [line.strip() for line in text.splitlines()]
    if not any(prompts):
        raise UserError(f"prompt file {path} has no prompts")
    return prompts


def parse_size(size: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    if not size:
        return None, None
    try:
        h, w = (int(v) for v in size.lower().split("x")) if "x" in size.lower() else (int(size),) * 2
    except ValueError:
        raise UserError(f"--size must look like 32 or 32x48, got {size!r}") from None
    if h <= 0 or w <= 0:
        raise UserError(f"--size must be positive, got {size!r}")
    return h, w
