"""ListOps generator against the LRA spec, Pathfinder labels, byte-level TSV loading and its errors."""
import csv

import numpy as np
import pytest

from ernielab.sparse.lra import (
    LISTOPS_OPERATORS,
    LISTOPS_VOCAB,
    ListOpsSpec,
    PathfinderSpec,
    collate_sequences,
    generate_listops,
    generate_pathfinder,
    load_listops,
    load_pathfinder,
    load_text_tsv,
    tokenize_listops,
    write_listops,
    write_pathfinder,
)


def parse_listops(source: str):
    """Independent stack evaluator over the text; returns (value, length, depth, arg counts, operators)."""
    stack, length, depth, max_depth, arg_counts, ops = [], 0, 0, 0, [], set()
    for tok in source.split():
        if tok in "()":
            continue
        length += 1
        if tok.startswith("["):
            ops.add(tok)
            stack.append([tok])
            depth += 1
            max_depth = max(max_depth, depth)
        elif tok == "]":
            op, *args = stack.pop()
            depth -= 1
            arg_counts.append(len(args))
            value = {"[MIN": min(args), "[MAX": max(args), "[SM": sum(args) % 10,
                     "[MED": int(np.median(args))}[op]
            (stack[-1] if stack else stack).append(value)
        else:
            max_depth = max(max_depth, depth + 1)
            (stack[-1] if stack else stack).append(int(tok))
    assert len(stack) == 1 and isinstance(stack[0], int)
    return stack[0], length, max_depth, arg_counts, ops


def test_listops_official_spec_defaults():
    spec = ListOpsSpec()
    assert (spec.max_depth, spec.max_args, spec.operator_prob) == (10, 10, 0.25)
    assert (spec.min_length, spec.max_length) == (500, 2000)
    assert (spec.num_train, spec.num_val, spec.num_test) == (96_000, 2_000, 2_000)
    rows = generate_listops(spec.replace(num_train=12, num_val=2, num_test=2), seed=1, progress=False)
    for source, target in rows["train"]:
        value, length, depth, args, ops = parse_listops(source)
        assert 500 < length < 2000 and depth <= 10 and value == target
        assert len(tokenize_listops(source)) == length


def test_listops_generator_properties(tmp_path):
    spec = ListOpsSpec(max_depth=4, max_args=5, min_length=20, max_length=120, num_train=300, num_val=40, num_test=40)
    paths = write_listops(tmp_path, spec, seed=0, progress=False)
    seen, all_ops, deepest, widest = set(), set(), 0, 0
    for split, n in (("train", 300), ("val", 40), ("test", 40)):
        with open(paths[split], newline="") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        assert rows[0] == ["Source", "Target"] and len(rows) == n + 1
        for source, target in rows[1:]:
            value, length, depth, args, ops = parse_listops(source)
            assert 20 < length < 120
            assert depth <= 4 and all(2 <= a <= 5 for a in args)
            assert value == int(target)
            assert source not in seen  # de-duplicated across all splits
            seen.add(source)
            all_ops |= ops
            deepest, widest = max(deepest, depth), max(widest, max(args))
    assert all_ops == set(LISTOPS_OPERATORS)
    assert deepest == 4 and widest == 5  # the bounds are reached, not just respected
    again = generate_listops(spec, seed=0, progress=False)
    assert [s for s, _ in again["val"]] == [r[0] for r in csv.reader(open(paths["val"]), delimiter="\t")][1:]


def test_listops_tokenizer_keeps_closing_bracket():
    ids = tokenize_listops("( ( ( [MAX 2 ) 9 ) ] )")
    assert [LISTOPS_VOCAB[i] for i in ids] == ["[MAX", "2", "9", "]"]
    with pytest.raises(ValueError, match="unknown ListOps token"):
        tokenize_listops("( [FOO 1 ] )")


def test_listops_spec_rejects_unreachable_lengths():
    with pytest.raises(ValueError, match="unreachable"):
        ListOpsSpec(max_depth=2, max_args=3, min_length=50, max_length=100)
    with pytest.raises(ValueError):
        ListOpsSpec(min_length=10, max_length=11)


def test_listops_loader_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("Source\tTarget\n( [MAX 1 2 ] )\t2\n( [MAX 1 2 ] )\t12\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3: ListOps target"):
        load_listops(bad)
    bad.write_text("Source\tTarget\n( [MAX 1 x ] )\t2\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: unknown ListOps token 'x'"):
        load_listops(bad)
    good = tmp_path / "good.tsv"
    good.write_text("Source\tTarget\n( ( ( [MIN 4 ) 7 ) ] )\t4\n")
    ds = load_listops(good, max_len=3)
    assert len(ds[0][0]) == 3 and ds.num_classes == 10


def test_text_tsv_roundtrip_and_labels(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("id\tSource\tTarget\n1\thé\tpos\n2\tbad film\tneg\n3\t\"tab\there\"\tpos\n")
    ds, labels = load_text_tsv(path, max_len=5)
    assert labels == ["neg", "pos"] and list(ds.labels) == [1, 0, 1]
    assert ds[0][0].tolist() == [b + 1 for b in "hé".encode()]
    assert len(ds[2][0]) == 5  # quoted field with a tab, cut to max_len
    tokens, targets = collate_sequences([ds[0], ds[1]])
    assert tokens.shape == (2, 5) and tokens[0, 3:].eq(0).all() and targets.tolist() == [1, 0]
    other = tmp_path / "val.tsv"
    other.write_text("Source\tTarget\nfine\tmeh\n")
    with pytest.raises(ValueError, match=r"val.tsv:2: label 'meh' is not one of"):
        load_text_tsv(other, labels=labels)


@pytest.mark.parametrize("content,message", [
    ("", "is empty"),
    ("text\tlabel\nhi\t1\n", "lacks column"),
    ("Source\tTarget\nhi\t1\nthere\n", r":3: expected 2 tab-separated fields, found 1"),
    ("Source\tTarget\n", "no examples"),
    ("Source\tTarget\nhi\t\nho\t1\n", ":2: empty label"),
    (b"Source\tTarget\n\xff\xfe\t1\n", "not UTF-8"),
])
def test_text_tsv_errors(tmp_path, content, message):
    path = tmp_path / "data.tsv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match=message):
        load_text_tsv(path)
    with pytest.raises(FileNotFoundError):
        load_text_tsv(tmp_path / "missing.tsv")


def test_pathfinder_labels_match_connectivity(tmp_path):
    from scipy import ndimage

    spec = PathfinderSpec(gap=0, num_train=200, num_val=4, num_test=4)  # solid curves: connectivity is visible
    data = generate_pathfinder(spec, seed=0, progress=False)["train"]
    assert data["images"].shape == (200, 32, 32) and data["labels"].mean() == 0.5
    for image, label in zip(data["images"], data["labels"]):
        ink = image > 0
        markers = ndimage.binary_erosion(ink, np.ones((3, 3)))  # only the 3x3 end dots survive
        components, _ = ndimage.label(ink, np.ones((3, 3)))
        marker_components = set(components[markers].tolist())
        assert len(marker_components) == (1 if label else 2)
    paths = write_pathfinder(tmp_path, spec.replace(num_train=6, gap=1), seed=0, progress=False)
    ds = load_pathfinder(tmp_path, "train")
    assert len(ds) == 6 and len(ds[0][0]) == 1024 and ds.vocab_size == 257
    assert set(ds[0][0].unique().tolist()) <= {1, 256}  # background and ink, shifted past padding
    paths["val"].write_bytes(b"not an npz")
    with pytest.raises(ValueError, match="not a pathfinder"):
        load_pathfinder(tmp_path, "val")


def test_pathfinder_easy_options_keep_labels_correct():
    """Distinct end-dot intensity, solid curves and no distractors: labels still follow connectivity."""
    from scipy import ndimage

    spec = PathfinderSpec.for_size(16, gap=0, num_distractors=0, marker_value=128, num_train=40, num_val=2,
                                   num_test=2)
    assert (spec.size, spec.path_length, spec.distractor_length) == (16, 10, 5)
    assert PathfinderSpec.for_size(32) == PathfinderSpec()  # the scaling reproduces the 32x32 defaults
    data = generate_pathfinder(spec, seed=1, progress=False)["train"]
    assert data["images"].shape == (40, 16, 16) and data["labels"].mean() == 0.5
    for image, label in zip(data["images"], data["labels"]):
        assert set(np.unique(image).tolist()) <= {0, 128, 255}
        markers = image == 128
        assert 9 <= markers.sum() <= 18  # two 3x3 dots; the two ends of one curve may overlap
        components, _ = ndimage.label(image > 0, np.ones((3, 3)))
        assert len(set(components[markers].tolist())) == (1 if label else 2)
    with pytest.raises(ValueError, match="marker_value"):
        PathfinderSpec(marker_value=0)


def test_pathfinder_match_distance_removes_the_dot_distance_cue():
    from scipy import ndimage

    def dot_gaps(spec):
        data = generate_pathfinder(spec, seed=2, progress=False)["train"]
        gaps = []
        for image, label in zip(data["images"], data["labels"]):
            markers = image == 128
            components, _ = ndimage.label(image > 0, np.ones((3, 3)))
            assert len(set(components[markers].tolist())) == (1 if label else 2)  # labels stay correct
            parts, count = ndimage.label(markers)
            centres = ndimage.center_of_mass(markers, parts, [1, 2]) if count == 2 else [(0, 0), (0, 0)]
            gaps.append(np.linalg.norm(np.subtract(*centres)))
        gaps, labels = np.array(gaps), data["labels"]
        return gaps[labels == 1].mean(), gaps[labels == 0].mean()

    spec = PathfinderSpec.for_size(16, gap=0, marker_value=128, num_train=200, num_val=0, num_test=0)
    positive, negative = dot_gaps(spec)
    assert negative - positive > 1.0  # unmatched: negatives' dots lie farther apart
    positive, negative = dot_gaps(spec.replace(match_distance=True))
    assert abs(negative - positive) < 0.5
