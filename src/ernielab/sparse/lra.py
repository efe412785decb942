"""Long Range Arena style data: ListOps, Pathfinder-style images and byte-level TSV text classification.

ListOps follows the official LRA generator specification: operators MAX, MIN, MED, SM (sum mod 10)
over digits 0-9, an operator node with probability 0.25 (depth < 10), 2..10 arguments, kept when its
length (values + operator + closing bracket tokens) lies strictly between 500 and 2000, de-duplicated,
96k/2k/2k splits written as `basic_{train,val,test}.tsv` with a `Source\tTarget` header. Sources use
the official bracketed text, e.g. `( ( ( [MAX 2 ) 9 ) ] )`; the tokenizer drops the grouping
parentheses and keeps `]` as its own token (the LRA pipeline's default tokenizer lost it).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ernielab.core.config import Config, bounded

PAD_ID = 0

# ---- ListOps -------------------------------------------------------------------------------------
LISTOPS_OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
LISTOPS_END = "]"
LISTOPS_VOCAB = ("<pad>", *(str(d) for d in range(10)), *LISTOPS_OPERATORS, LISTOPS_END)
LISTOPS_TOKEN_ID = {tok: i for i, tok in enumerate(LISTOPS_VOCAB)}
LISTOPS_FILES = {"train": "basic_train.tsv", "val": "basic_val.tsv", "test": "basic_test.tsv"}
SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class ListOpsSpec(Config):
    max_depth: int = 10
    max_args: int = 10
    min_length: int = 500  # exclusive, as in the official generator
    max_length: int = 2000  # exclusive
    operator_prob: float = 0.25
    num_train: int = 96_000
    num_val: int = 2_000
    num_test: int = 2_000

    def __post_init__(self):
        if self.max_depth < 1 or self.max_args < 2:
            raise ValueError("ListOps needs max_depth >= 1 and max_args >= 2")
        if not 0 < self.operator_prob < 1:
            raise ValueError(f"operator_prob must be in (0, 1), got {self.operator_prob}")
        if self.max_length - self.min_length < 2:
            raise ValueError(f"no integer length lies strictly between {self.min_length} and {self.max_length}")
        if self.longest_possible() <= self.min_length:
            raise ValueError(f"trees of depth <= {self.max_depth} with <= {self.max_args} args never exceed "
                             f"{self.longest_possible()} tokens; min_length {self.min_length} is unreachable")
        if min(self.num_train, self.num_val, self.num_test) < 0:
            raise ValueError("split sizes must be >= 0")

    def longest_possible(self) -> int:
        length = 1  # a leaf at max_depth
        for _ in range(self.max_depth - 1):
            length = 2 + self.max_args * length
        return length


def generate_listops_tree(rng: random.Random, spec: ListOpsSpec, depth: int = 1):
    """Random expression; returns (tree, length). A tree is a digit or (operator, tuple_of_args).

    The draws follow the official generator's order (uniform draw, args, then operator), so one seed
    gives the same trees as the reference script under the same `random` state.
    """
    if (rng.random() if depth < spec.max_depth else 1.0) > spec.operator_prob:
        return rng.choice(range(10)), 1
    args, length = [], 2  # operator token + closing bracket
    for _ in range(rng.randint(2, spec.max_args)):
        arg, arg_len = generate_listops_tree(rng, spec, depth + 1)
        args.append(arg)
        length += arg_len
    return (rng.choice(LISTOPS_OPERATORS), tuple(args)), length


def listops_source(tree) -> str:
    """Official text form: each argument application and the closing bracket add one '( .. )' level."""
    if isinstance(tree, int):
        return str(tree)
    op, args = tree
    text = op
    for arg in args:
        text = f"( {text} {listops_source(arg)} )"
    return f"( {text} {LISTOPS_END} )"


def listops_value(tree) -> int:
    if isinstance(tree, int):
        return tree
    op, args = tree
    values = sorted(listops_value(a) for a in args)
    if op == "[MIN":
        return values[0]
    if op == "[MAX":
        return values[-1]
    if op == "[MED":  # the reference truncates the (possibly .5) median to an int
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) // 2
    if op == "[SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {op!r}")


def generate_listops(spec: ListOpsSpec, seed: int = 0, progress: bool = True) -> dict[str, list[tuple[str, int]]]:
    """Distinct (source, target) pairs split into train/val/test, in generation order (i.i.d. draws)."""
    rng = random.Random(seed)
    total = spec.num_train + spec.num_val + spec.num_test
    seen: set[str] = set()
    rows: list[tuple[str, int]] = []
    misses = 0
    with tqdm(total=total, desc="listops", disable=not progress) as bar:
        while len(rows) < total:
            tree, length = generate_listops_tree(rng, spec)
            if not spec.min_length < length < spec.max_length:
                continue
            source = listops_source(tree)
            if source in seen:
                misses += 1
                if misses > 100 * total + 1000:
                    raise ValueError(f"only {len(rows)} distinct ListOps examples found; widen the length range")
                continue
            seen.add(source)
            rows.append((source, listops_value(tree)))
            bar.update(1)
    cut1, cut2 = spec.num_train, spec.num_train + spec.num_val
    return {"train": rows[:cut1], "val": rows[cut1:cut2], "test": rows[cut2:]}


def write_tsv(path: str | Path, rows: Sequence[tuple], header: tuple[str, ...] = ("Source", "Target")) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)  # never leave a half-written split behind


def write_listops(out_dir: str | Path, spec: ListOpsSpec, seed: int = 0, progress: bool = True) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate_listops(spec, seed, progress)
    paths = {}
    for split, rows in splits.items():
        paths[split] = out / LISTOPS_FILES[split]
        write_tsv(paths[split], rows)
    (out / "listops_spec.json").write_text(json.dumps({"seed": seed, **spec.to_dict()}, indent=2) + "\n")
    return paths


def tokenize_listops(source: str) -> list[int]:
    """Whitespace tokens; '(' and ')' only group the text and are dropped; ']' stays a token."""
    ids = []
    for tok in source.split():
        if tok in ("(", ")"):
            continue
        if tok not in LISTOPS_TOKEN_ID or tok == "<pad>":
            raise ValueError(f"unknown ListOps token {tok!r}")
        ids.append(LISTOPS_TOKEN_ID[tok])
    return ids


# ---- TSV reading ---------------------------------------------------------------------------------
def read_tsv(path: str | Path, columns: tuple[str, str] = ("Source", "Target")) -> list[tuple[int, str, str]]:
    """Rows of a headed TSV as (line_number, text, label); clear errors for malformed files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"TSV file not found: {path}")
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", strict=True)
            header = next(reader, None)
            if not header:
                raise ValueError(f"{path} is empty; expected a header row with columns {list(columns)}")
            missing = [c for c in columns if c not in header]
            if missing:
                raise ValueError(f"{path}: header {header} lacks column(s) {missing}; expected a "
                                 f"tab-separated header containing {list(columns)}")
            text_col, label_col = (header.index(c) for c in columns)
            for row in reader:
                if not row:
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{path}:{reader.line_num}: expected {len(header)} tab-separated fields, "
                                     f"found {len(row)}")
                rows.append((reader.line_num, row[text_col], row[label_col].strip()))
    except csv.Error as e:
        raise ValueError(f"{path}: malformed TSV: {e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not rows:
        raise ValueError(f"{path} has a header but no examples")
    return rows


# ---- datasets ------------------------------------------------------------------------------------
class SequenceDataset(torch.utils.data.Dataset):
    """Token sequences (PAD_ID-free) with integer labels."""

    def __init__(self, sequences: list[np.ndarray], labels: Sequence[int], vocab_size: int, num_classes: int):
        if len(sequences) != len(labels):
            raise ValueError(f"{len(sequences)} sequences but {len(labels)} labels")
        self.sequences = sequences
        self.labels = np.asarray(labels, dtype=np.int64)
        self.vocab_size = vocab_size
        self.num_classes = num_classes

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(self.sequences[i].astype(np.int64)), int(self.labels[i])


def collate_sequences(items: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad with PAD_ID to the longest sequence of the batch -> (tokens [B, S], labels [B])."""
    length = max(1, max(len(seq) for seq, _ in items))
    tokens = torch.full((len(items), length), PAD_ID, dtype=torch.long)
    for row, (seq, _) in enumerate(items):
        tokens[row, : len(seq)] = seq
    return tokens, torch.tensor([label for _, label in items], dtype=torch.long)


def _split_file(data: str | Path, split: str, names: dict[str, str]) -> Path:
    data = Path(data)
    if data.is_dir():
        return data / names[split]
    return data


def load_listops(data: str | Path, split: str = "train", max_len: int = 2000) -> SequenceDataset:
    """`data` is a folder with basic_{split}.tsv or one TSV file; sequences longer than max_len are cut."""
    path = _split_file(data, split, LISTOPS_FILES)
    sequences, labels = [], []
    for line, source, target in read_tsv(path):
        try:
            ids = tokenize_listops(source)
        except ValueError as e:
            raise ValueError(f"{path}:{line}: {e}") from None
        if not target.isdigit() or int(target) > 9:
            raise ValueError(f"{path}:{line}: ListOps target must be a digit 0-9, got {target!r}")
        if not ids:
            raise ValueError(f"{path}:{line}: empty ListOps source")
        sequences.append(np.asarray(ids[:max_len], dtype=np.int16))
        labels.append(int(target))
    return SequenceDataset(sequences, labels, vocab_size=len(LISTOPS_VOCAB), num_classes=10)


BYTE_VOCAB = 257  # PAD + 256 byte values


def infer_labels(values: Sequence[str]) -> list[str]:
    """Distinct labels in a stable order: numeric order when all are integers, else sorted text."""
    unique = set(values)
    if all(v.lstrip("-").isdigit() for v in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def load_text_tsv(
    path: str | Path,
    max_len: int = 4000,
    labels: Sequence[str] | None = None,
    columns: tuple[str, str] = ("Source", "Target"),
) -> tuple[SequenceDataset, list[str]]:
    """Byte-level classification data from any headed TSV; returns (dataset, label names).

    Each text becomes its UTF-8 bytes shifted by one (0 is padding), cut to max_len. Pass the training
    split's `labels` when loading evaluation splits so class ids agree.
    """
    rows = read_tsv(path, columns)
    for line, _, label in rows:
        if not label:
            raise ValueError(f"{path}:{line}: empty label")
    names = list(labels) if labels is not None else infer_labels([r[2] for r in rows])
    if len(names) < 2 and labels is None:
        raise ValueError(f"{path}: needs at least two distinct labels, found {names}")
    index = {name: i for i, name in enumerate(names)}
    sequences, targets = [], []
    for line, text, label in rows:
        if label not in index:
            raise ValueError(f"{path}:{line}: label {label!r} is not one of the training labels {names}")
        data = text.encode("utf-8")[:max_len]
        if not data:
            raise ValueError(f"{path}:{line}: empty text")
        sequences.append(np.frombuffer(data, dtype=np.uint8).astype(np.int16) + 1)
        targets.append(index[label])
    return SequenceDataset(sequences, targets, vocab_size=BYTE_VOCAB, num_classes=len(names)), names


TEXT_FILES = {split: f"{split}.tsv" for split in SPLITS}


# ---- Pathfinder-style images ---------------------------------------------------------------------
@dataclasses.dataclass
class PathfinderSpec(Config):
    """Two marked dots; label 1 when one dashed curve joins them, 0 when they sit on two different curves."""

    size: int = 32
    path_length: int = 20  # one-pixel steps per main curve
    num_distractors: int = 2
    distractor_length: int = 10
    dash: int = 2  # drawn steps per dash
    gap: int = 1  # blank steps between dashes
    turn_std: float = 0.35  # heading change per step (radians): the curvature
    clearance: int = 2  # curves keep > clearance pixels apart (Chebyshev), so 3x3 dots touch no other curve
    marker_value: int = 255  # intensity of the 3x3 end dots; below 255 they differ from curve ink
    match_distance: bool = False  # negatives' dot distance drawn like positives' (removes that shortcut)
    num_train: int = 20_000
    num_val: int = 2_000
    num_test: int = 2_000

    def __post_init__(self):
        if self.size < 12 or self.path_length < 4 or self.dash < 1 or self.gap < 0:
            raise ValueError("pathfinder needs size >= 12, path_length >= 4, dash >= 1, gap >= 0")
        if not 1 <= self.marker_value <= 255:
            raise ValueError(f"marker_value must be an intensity in 1..255, got {self.marker_value}")

    @classmethod
    def for_size(cls, size: int, **overrides) -> "PathfinderSpec":
        """Curve lengths and distractor count scaled with the image side from the 32x32 defaults;
        `overrides` (None values ignored) then set any field, e.g. an easier level with fewer distractors."""
        scale = size / cls.size
        scaled = dict(size=size, path_length=max(4, round(cls.path_length * scale)),
                      distractor_length=max(4, round(cls.distractor_length * scale)),
                      num_distractors=round(cls.num_distractors * scale))
        return cls(**{**scaled, **{k: v for k, v in overrides.items() if v is not None}})


def _trace_curve(rng: np.random.Generator, spec: PathfinderSpec, steps: int) -> np.ndarray:
    """Smooth random walk of unit steps that turns back at the border; [steps+1, 2] integer pixels."""
    lo, hi = 2.0, spec.size - 3.0
    y, x = rng.uniform(lo, hi, 2).tolist()
    heading = rng.uniform(0, 2 * math.pi)
    turns = rng.normal(0.0, spec.turn_std, steps).tolist()
    points = [(y, x)]
    for turn in turns:
        heading += turn
        dy, dx = math.sin(heading), math.cos(heading)
        if not (lo <= y + dy <= hi and lo <= x + dx <= hi):
            heading += math.pi  # bounce off the border
            dy, dx = -dy, -dx
        y, x = min(max(y + dy, lo), hi), min(max(x + dx, lo), hi)
        points.append((y, x))
    return np.rint(np.array(points)).astype(np.int64)


def _footprint(points: np.ndarray, size: int, radius: int) -> np.ndarray:
    """Pixels within Chebyshev distance `radius` of the points (separable box dilation)."""
    grid = np.zeros((size + 2 * radius, size + 2 * radius), dtype=bool)
    grid[points[:, 0] + radius, points[:, 1] + radius] = True
    for axis in (0, 1):
        grid = np.logical_or.reduce([np.roll(grid, shift, axis) for shift in range(-radius, radius + 1)])
    return grid[radius: radius + size, radius: radius + size]


def _place_curves(rng: np.random.Generator, spec: PathfinderSpec, max_tries: int) -> list[np.ndarray]:
    """Two main curves, then the distractors, none touching another."""
    lengths = [spec.path_length, spec.path_length] + [spec.distractor_length] * spec.num_distractors
    for _ in range(max_tries):
        curves = [_trace_curve(rng, spec, n) for n in lengths]
        taken = np.zeros((spec.size, spec.size), dtype=bool)
        clear = True
        for curve in curves:  # curves must not touch, or a "negative" pair could be joined
            if taken[curve[:, 0], curve[:, 1]].any():
                clear = False
                break
            taken |= _footprint(curve, spec.size, spec.clearance)
        if clear:
            return curves
    raise ValueError("could not place non-touching curves; lower path lengths or distractors")


def _pick_ends(rng: np.random.Generator, curves: list[np.ndarray], label: int) -> list[np.ndarray]:
    first, second = curves[0], curves[1]
    if label:
        return [first[0], first[-1]]
    return [first[-int(rng.integers(2))], second[-int(rng.integers(2))]]  # one end of each main curve


def _dots_touch(ends: list[np.ndarray]) -> bool:
    """Two 3x3 dots whose centres are under 4 pixels apart (Chebyshev) share or touch pixels: on a
    negative that would draw a connection between the two curves."""
    return int(np.abs(ends[0] - ends[1]).max()) < 4


def draw_pathfinder(rng: np.random.Generator, spec: PathfinderSpec, label: int, max_tries: int = 1000) -> np.ndarray:
    """One [size, size] uint8 image (0 background, 255 ink) with the requested label.

    A negative is redrawn while its two dots touch (that would join its curves). With
    spec.match_distance, positives obey the same rule, and a negative first draws the end-to-end distance
    of a fresh main curve (what a positive's dots would show) and is redrawn until its two dots lie that
    far apart (+- 0.5 pixel): the dot distance no longer tells the classes apart, only the curves do.
    """
    target = None
    if spec.match_distance and not label:
        probe = [np.zeros(2)] * 2
        while _dots_touch(probe):  # the dots of a full positive image, drawn under the same rules
            probe = _pick_ends(rng, _place_curves(rng, spec, max_tries), 1)
        target = float(np.linalg.norm(probe[0] - probe[-1]))
    for _ in range(max_tries):
        curves = _place_curves(rng, spec, max_tries)
        ends = _pick_ends(rng, curves, label)
        if (not label or spec.match_distance) and _dots_touch(ends):
            continue  # touching dots join a negative's curves; matched positives follow the same rule
        if target is None or abs(float(np.linalg.norm(ends[0] - ends[1])) - target) <= 0.5:
            break
    else:
        raise ValueError(f"no negative with dot distance {target:.1f} in {max_tries} tries")
    image = np.zeros((spec.size, spec.size), dtype=np.uint8)
    period = spec.dash + spec.gap
    for curve in curves:
        ink = curve[np.arange(len(curve)) % period < spec.dash]
        image[ink[:, 0], ink[:, 1]] = 255
    for y, x in ends:
        image[max(0, y - 1): y + 2, max(0, x - 1): x + 2] = spec.marker_value
    return image


def generate_pathfinder(spec: PathfinderSpec, seed: int = 0, progress: bool = True) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    counts = {"train": spec.num_train, "val": spec.num_val, "test": spec.num_test}
    out = {}
    with tqdm(total=sum(counts.values()), desc="pathfinder", disable=not progress) as bar:
        for split, n in counts.items():
            labels = rng.permutation(np.arange(n) % 2)  # balanced classes
            images = np.zeros((n, spec.size, spec.size), dtype=np.uint8)
            for i, label in enumerate(labels):
                images[i] = draw_pathfinder(rng, spec, int(label))
                bar.update(1)
            out[split] = {"images": images, "labels": labels.astype(np.int64)}
    return out


def write_pathfinder(
    out_dir: str | Path, spec: PathfinderSpec, seed: int = 0, progress: bool = True
) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, arrays in generate_pathfinder(spec, seed, progress).items():
        paths[split] = out / f"pathfinder_{split}.npz"
        tmp = out / f".pathfinder_{split}.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(paths[split])
    (out / "pathfinder_spec.json").write_text(json.dumps({"seed": seed, **spec.to_dict()}, indent=2) + "\n")
    return paths


PIXEL_VOCAB = 257  # PAD + 256 intensities


def load_pathfinder(data: str | Path, split: str = "train") -> SequenceDataset:
    """Images flattened row-major to size*size tokens (intensity + 1)."""
    path = _split_file(data, split, {s: f"pathfinder_{s}.npz" for s in SPLITS})
    if not path.is_file():
        raise FileNotFoundError(f"pathfinder file not found: {path} (create it with `gen-pathfinder`)")
    try:
        with np.load(path) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{path} is not a pathfinder .npz with 'images' and 'labels': {e}") from None
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(f"{path}: expected uint8 images [N, H, W] and N labels, got {images.shape} / {labels.shape}")
    flat = images.reshape(len(images), -1).astype(np.int16) + 1
    return SequenceDataset(list(flat), labels.astype(np.int64), vocab_size=PIXEL_VOCAB, num_classes=2)


# ---- one entry point -----------------------------------------------------------------------------
TASKS = ("listops", "pathfinder", "text")


def load_task(
    task: str, data: str | Path, split: str, max_len: int, labels: Sequence[str] | None = None
) -> tuple[SequenceDataset, list[str] | None]:
    """(dataset, label names) for a task; `data` is the task folder or a single split file."""
    if task == "listops":
        return load_listops(data, split, max_len), None
    if task == "pathfinder":
        ds = load_pathfinder(data, split)
        if ds.sequences and len(ds.sequences[0]) > max_len:
            raise ValueError(f"pathfinder images have {len(ds.sequences[0])} pixels; model max_len is {max_len}")
        return ds, None
    if task == "text":
        return load_text_tsv(_split_file(data, split, TEXT_FILES), max_len, labels)
    raise ValueError(f"unknown task {task!r}; use one of {TASKS}")


def split_exists(task: str, data: str | Path, split: str) -> bool:
    data = Path(data)
    if not data.is_dir():
        return split == "train" and data.is_file()
    names = {"listops": LISTOPS_FILES, "text": TEXT_FILES,
             "pathfinder": {s: f"pathfinder_{s}.npz" for s in SPLITS}}[task]
    return (data / names[split]).is_file()


# ---- the data section of a training config ---------------------------------------------------------
@dataclasses.dataclass
class SparseDataConfig(Config):
    """Which data a run trains on: the task, its folder, and (for the generated tasks) how the data was made.

    With a `listops` / `pathfinder` spec, missing data is generated into `path` with `seed` before training,
    and data already there must have been made with the same spec (its `<task>_spec.json`); without one the
    folder's files are used as they are.
    """

    task: str = bounded("listops", choices=TASKS)
    path: str = "data/listops"  # folder of split files (ListOps basic_*.tsv, pathfinder_*.npz, text *.tsv)
    listops: ListOpsSpec | None = None
    pathfinder: PathfinderSpec | None = None
    seed: int = 0  # the generator's seed (the training seed is the training config's `seed`)
    # text: the class names in id order; empty = the training split's labels, sorted (filled in when a run
    # starts, so the run's saved config says what each class id means)
    labels: list[str] = dataclasses.field(default_factory=list)

    def check(self) -> None:
        if not self.path:
            raise ValueError("path: the data folder is required")
        for name in ("listops", "pathfinder"):
            if getattr(self, name) is not None and self.task != name:
                raise ValueError(f"a {name} generator spec does not fit task {self.task!r}")
        if self.labels and self.task != "text":
            raise ValueError("labels name the classes of text data; listops and pathfinder have fixed classes")

    @property
    def spec(self) -> ListOpsSpec | PathfinderSpec | None:
        return self.listops if self.task == "listops" else self.pathfinder if self.task == "pathfinder" else None


def ensure_data(data: SparseDataConfig, progress: bool = True) -> bool:
    """Generate the data of `data` when its training split is missing and a generator spec is given (-> True);
    refuse data made with another spec, so a run never trains on another variant than its config states."""
    spec = data.spec
    if split_exists(data.task, data.path, "train"):
        saved = Path(data.path) / f"{data.task}_spec.json"
        if spec is not None and saved.is_file():
            wanted = {"seed": data.seed, **spec.to_dict()}
            found = {**wanted, **json.loads(saved.read_text())}  # fields added later keep their defaults
            changed = sorted(k for k in wanted if wanted[k] != found[k])
            if changed:
                raise ValueError(f"{data.path} was generated with other settings ({', '.join(changed)}) than the "
                                 f"config's data.{data.task}; use another data.path")
        return False
    if spec is None:
        raise FileNotFoundError(f"no {data.task} training split in {data.path} (generate it with `ernielab sparse "
                                f"gen-{data.task}`, or give the config a data.{data.task} spec to generate it)"
                                if data.task != "text" else f"no training split {data.path}/train.tsv")
    write = write_listops if data.task == "listops" else write_pathfinder
    write(data.path, spec, seed=data.seed, progress=progress)
    return True
