import pytest

from ernielab.sparse.lra import ListOpsSpec, generate_listops, write_tsv


@pytest.fixture(scope="module")
def listops_dir(tmp_path_factory):
    """Tiny ListOps: 64 train / 16 val examples of 5-29 tokens, no test split."""
    root = tmp_path_factory.mktemp("listops")
    spec = ListOpsSpec(max_depth=3, max_args=3, min_length=4, max_length=30, num_train=64, num_val=16, num_test=0)
    for split, rows in generate_listops(spec, seed=0, progress=False).items():
        if rows:
            write_tsv(root / f"basic_{split}.tsv", rows)
    return root
