"""The error contract, tried as a new user would: every bad input to every command gives one line
`error: ...`, exit code 2, no traceback, and writes nothing (not in the working folder, not in the inputs).

Each case runs the real `ernielab` app in-process (typer's CliRunner) in a fresh working folder. The cases
cover the kinds a user hits: missing/corrupt/truncated files, wrong types and ranges in configs and --set,
absurd numbers, paths that cannot be written (a file in the way, a read-only file system), unknown names.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ernielab.cli.main import app

REPO = Path(__file__).resolve().parents[2]
READ_ONLY = "/sys/ernielab-out"  # not writable even by root

# family -> the smallest shipped config its `train` command takes
TRAIN_CONFIGS = {
    "image": "configs/image/tiny.json",
    "turbo": "configs/turbo/dmd.json",
    "dpo": "configs/dpo/tiny.json",
    "vilg": "configs/vilg/stage1.json",
    "aesthetic": "configs/aesthetic/default.json",
    "enhancer": "configs/enhancer/default.json",
    "sparse": "configs/sparse/listops.json",
    "unified": "configs/unified/moe.json",
}

# bad `--set` overrides every family's train command must refuse; the engine's fields exist in all of them
BAD_SETS = {
    "steps_zero": ["--set", "steps=0"],
    "steps_negative": ["--set", "steps=-5"],
    "batch_zero": ["--set", "batch_size=0"],
    "batch_negative": ["--set", "batch_size=-1"],
    "save_every_zero": ["--set", "save_every=0"],
    "lr_text": ["--set", "lr=abc"],
    "lr_nan": ["--set", "lr=NaN"],
    "seed_float": ["--set", "seed=1.5"],
    "unknown_field": ["--set", "no_such_field=1"],
    "not_key_value": ["--set", "steps"],
    "schedule_unknown": ["--set", "lr_schedule=linear"],
    "precision_unknown": ["--set", "mixed_precision=fp8"],
    "output_file_in_the_way": ["--output-dir", "{inputs}/a_file.txt"],
    "output_read_only": ["--output-dir", READ_ONLY + "/run"],
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_pipeline_dir) -> Path:
    """Bad artefacts to feed the commands (a folder the cases must not change)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "a_file.txt").write_text("not a folder\n")
    (root / "not_json.json").write_text("{ this is not json")
    (root / "list.json").write_text("[]")
    (root / "empty_prompts.txt").write_text("\n\n")
    (root / "binary_prompts.txt").write_bytes(b"\xff\xfe\x00bad")
    image = json.loads((REPO / TRAIN_CONFIGS["image"]).read_text())
    (root / "six_layers.json").write_text(json.dumps({**image, "model": {**image.get("model", {}), "num_layers": "six"}}))
    (root / "bool_steps.json").write_text(json.dumps({**image, "steps": True}))
    (root / "unknown_key.json").write_text(json.dumps({**image, "lerning_rate": 0.1}))
    for name, damage in [("truncated", lambda b: b[: len(b) // 2]), ("corrupt", lambda b: b"\x00" * 64 + b[64:]),
                         ("empty", lambda b: b"")]:
        folder = root / f"{name}_pipeline"
        shutil.copytree(tiny_pipeline_dir, folder)
        weights = folder / "transformer" / "model.safetensors"
        weights.write_bytes(damage(weights.read_bytes()))
    if not (root.parent / "tiny_pipe").exists():
        shutil.copytree(tiny_pipeline_dir, root.parent / "tiny_pipe")
    folder = root / "list_pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    (folder / "pipeline.json").write_text("[]")
    folder = root / "no_transformer"
    shutil.copytree(tiny_pipeline_dir, folder)
    shutil.rmtree(folder / "transformer")
    (root / "empty_run").mkdir()
    return root


def generate_cases() -> dict[str, list[str]]:
    one = ["generate", "a red circle", "-o", "out.png"]
    return {
        "no_prompt": ["generate"],
        "prompt_and_file": ["generate", "x", "--prompts", "{inputs}/empty_prompts.txt"],
        "missing_prompt_file": ["generate", "--prompts", "{inputs}/nope.txt"],
        "empty_prompt_file": ["generate", "--prompts", "{inputs}/empty_prompts.txt"],
        "binary_prompt_file": ["generate", "--prompts", "{inputs}/binary_prompts.txt"],
        "prompt_file_is_folder": ["generate", "--prompts", "{inputs}"],
        "empty_prompt": ["generate", "", "-o", "out.png"],
        "steps_zero": [*one, "--steps", "0"],
        "steps_negative": [*one, "--steps", "-3"],
        "guidance_nan": [*one, "--guidance", "nan"],
        "guidance_inf": [*one, "--guidance", "inf"],
        "guidance_negative": [*one, "--guidance", "-1"],
        "shift_negative": [*one, "--shift", "-1"],
        "shift_zero": [*one, "--shift", "0"],
        "size_huge": [*one, "--size", "100000"],
        "size_zero": [*one, "--size", "0"],
        "size_text": [*one, "--size", "big"],
        "size_odd": [*one, "--size", "33"],
        "batch_zero": [*one, "--batch-size", "0"],
        "model_missing": [*one, "--model", "{inputs}/nope"],
        "model_is_file": [*one, "--model", "{inputs}/a_file.txt"],
        "model_truncated": [*one, "--model", "{inputs}/truncated_pipeline"],
        "model_corrupt": [*one, "--model", "{inputs}/corrupt_pipeline"],
        "model_empty_weights": [*one, "--model", "{inputs}/empty_pipeline"],
        "model_pipeline_json_list": [*one, "--model", "{inputs}/list_pipeline"],
        "model_no_transformer": [*one, "--model", "{inputs}/no_transformer"],
        "output_dir_in_the_way": ["generate", "a red circle", "-o", "{inputs}/a_file.txt/out.png"],
        "output_read_only": ["generate", "a red circle", "-o", READ_ONLY + "/out.png"],
        "output_not_png": ["generate", "a red circle", "-o", "out.txt"],
        "prompts_out_in_the_way": ["generate", "--prompts", "{inputs}/../prompts_ok.txt", "--out", "{inputs}/a_file.txt"],
        "enhancer_missing": [*one, "--enhancer", "{inputs}/nope"],
    }


def image_cases() -> dict[str, list[str]]:
    return {
        "info_missing": ["info", "{inputs}/nope"],
        "info_not_a_pipeline": ["info", "{inputs}/empty_run"],
        "info_pipeline_json_list": ["info", "{inputs}/list_pipeline"],
        "eval_n_fid_negative": ["image", "eval", "--n-fid", "-1", "--n-align", "0"],
        "eval_n_align_negative": ["image", "eval", "--n-fid", "0", "--n-align", "-1"],
        "eval_nothing_to_do": ["image", "eval", "--n-fid", "0", "--n-align", "0"],
        "eval_unknown_data": ["image", "eval", "--data", "imagenet", "--n-fid", "2"],
        "eval_folder_without_path": ["image", "eval", "--data", "folder", "--n-fid", "2"],
        "eval_n_paraphrase_negative": ["image", "eval", "--n-fid", "0", "--n-paraphrase", "-1"],
        "eval_paraphrase_on_mnist": ["image", "eval", "--data", "mnist", "--n-fid", "0", "--n-paraphrase", "2"],
        "eval_holdout_malformed": ["image", "eval", "--n-fid", "0", "--holdout", "purple cat nearby"],
        "eval_model_corrupt": ["image", "eval", "--model", "{inputs}/corrupt_pipeline", "--n-fid", "2"],
        "eval_out_in_the_way": ["image", "eval", "--n-fid", "2", "--out", "{inputs}/a_file.txt"],
        "eval_out_read_only": ["image", "eval", "--n-fid", "2", "--out", READ_ONLY],
        "eval_steps_zero": ["image", "eval", "--n-fid", "2", "--steps", "0"],
        "export_not_a_run": ["image", "export", "{inputs}/empty_run", "--out", "exported"],
        "export_missing_run": ["image", "export", "{inputs}/nope", "--out", "exported"],
        "train_missing_config": ["image", "train", "{inputs}/nope.json"],
        "train_not_json": ["image", "train", "{inputs}/not_json.json"],
        "train_json_list": ["image", "train", "{inputs}/list.json"],
        "train_num_layers_text": ["image", "train", "{inputs}/six_layers.json"],
        "train_steps_bool": ["image", "train", "{inputs}/bool_steps.json"],
        "train_unknown_key": ["image", "train", "{inputs}/unknown_key.json"],
        "train_config_is_folder": ["image", "train", "{inputs}"],
    }


def train_cases() -> dict[str, list[str]]:
    cases = {}
    for family, config in TRAIN_CONFIGS.items():
        for name, extra in BAD_SETS.items():
            cases[f"{family}_train_{name}"] = [family, "train", str(REPO / config), *extra]
        cases[f"{family}_train_missing"] = [family, "train", "{inputs}/nope.json"]
        cases[f"{family}_train_not_json"] = [family, "train", "{inputs}/not_json.json"]
    return cases


def family_cases() -> dict[str, list[str]]:
    """The families' other commands: evaluation, data, pair making, scoring, rewriting."""
    pairs = ["dpo", "make-pairs", "--out", "pairs", "--model", "{inputs}/../tiny_pipe", "--n", "1"]
    return {
        "sparse_eval_missing_run": ["sparse", "eval", "{inputs}/nope"],
        "sparse_eval_not_a_run": ["sparse", "eval", "{inputs}/empty_run"],
        "sparse_eval_file_missing": ["sparse", "eval", "{inputs}/empty_run", "--file", "{inputs}/nope.tsv"],
        "sparse_gen_listops_out_in_the_way": ["sparse", "gen-listops", "{inputs}/a_file.txt/data", "--num-train", "2"],
        "sparse_gen_listops_negative": ["sparse", "gen-listops", "listops", "--num-train", "-1"],
        "unified_eval_missing_model": ["unified", "eval", "{inputs}/nope"],
        "unified_eval_not_a_model": ["unified", "eval", "{inputs}/empty_run"],
        "unified_generate_missing_model": ["unified", "generate-image", "{inputs}/nope", "a red circle"],
        "unified_caption_missing_model": ["unified", "caption", "{inputs}/nope", "{inputs}/a_file.txt"],
        "unified_vq_missing": ["unified", "vq", "{inputs}/nope.json"],
        "unified_rl_missing_model": ["unified", "rl", str(REPO / "configs/unified/rl_6k.json"),
                                     "--set", "init_from={inputs}/nope"],
        "unified_rl_group_of_one": ["unified", "rl", str(REPO / "configs/unified/rl_6k.json"),
                                    "--set", "group_size=1"],
        "unified_rl_unknown_task": ["unified", "rl", str(REPO / "configs/unified/rl_6k.json"),
                                    "--set", "tasks=[\"t2i\",\"text\"]"],
        "unified_vq_batch_zero": ["unified", "vq", str(REPO / "configs/unified/vq_tiny.json"), "--set", "batch_size=0"],
        "unified_vq_lr_text": ["unified", "vq", str(REPO / "configs/unified/vq_tiny.json"), "--set", "lr=abc"],
        "vilg_stage2_missing": ["vilg", "stage2", "{inputs}/nope.json"],
        "vilg_stage2_bad_experts": ["vilg", "stage2", str(REPO / "configs/vilg/stage2.json"), "--set", "experts=0"],
        "vilg_stage2_no_stage1": ["vilg", "stage2", str(REPO / "configs/vilg/stage2.json"), "--set",
                                  "stage1={inputs}/empty_run"],
        "dpo_pairs_n_zero": [*pairs[:-1], "0"],
        "dpo_pairs_unknown_kind": [*pairs, "--kinds", "colour"],
        "dpo_pairs_unknown_judge": [*pairs, "--judge", "oracle"],
        "dpo_pairs_judge_not_importable": [*pairs, "--judge", "no_such_module:judge"],
        "dpo_pairs_candidates_one": [*pairs, "-k", "1"],
        "dpo_pairs_out_in_the_way": ["dpo", "make-pairs", "--out", "{inputs}/a_file.txt", "--n", "1"],
        "dpo_pairs_model_corrupt": ["dpo", "make-pairs", "--out", "pairs", "--model", "{inputs}/corrupt_pipeline"],
        "dpo_pairs_steps_zero": [*pairs, "--steps", "0"],
        "aesthetic_eval_missing_bench": ["aesthetic", "eval", "{inputs}/nope"],
        "aesthetic_eval_not_a_bench": ["aesthetic", "eval", "{inputs}/empty_run"],
        "aesthetic_eval_bad_model": ["aesthetic", "eval", "{inputs}/empty_run", "--model", "{inputs}/empty_run"],
        "aesthetic_bench_n_zero": ["aesthetic", "benchmark", "bench", "--n-train", "0"],
        "aesthetic_bench_out_in_the_way": ["aesthetic", "benchmark", "{inputs}/a_file.txt", "--n-train", "4"],
        "aesthetic_bench_bad_set": ["aesthetic", "benchmark", "bench", "--set", "no_such_field=1"],
        "aesthetic_score_missing_image": ["aesthetic", "score", "{inputs}/nope.png"],
        "aesthetic_score_not_an_image": ["aesthetic", "score", "{inputs}/a_file.txt"],
        "enhance_empty_prompt": ["enhance", ""],
        "enhance_missing_model": ["enhance", "a red circle", "--model", "{inputs}/nope"],
        "enhance_top_p_out_of_range": ["enhance", "a red circle", "--top-p", "2"],
        "enhance_temperature_negative": ["enhance", "a red circle", "--temperature", "-1"],
        "enhance_prompt_file_missing": ["enhance", "--prompts", "{inputs}/nope.txt"],
    }


CASES = {**generate_cases(), **image_cases(), **train_cases(), **family_cases()}


def snapshot(*roots: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for root in roots for p in root.rglob("*")}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_one_error_line_and_exit_2(name, inputs, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (inputs.parent / "prompts_ok.txt").write_text("a red circle\n")
    monkeypatch.chdir(work)
    argv = [a.format(inputs=inputs) for a in CASES[name]]
    before = snapshot(work, inputs)
    result = CliRunner().invoke(app, argv)
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, f"{argv}: exit {result.exit_code}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    errors = [line for line in err if line.startswith("error: ")]
    usage = any(line.startswith(("Usage:", "Try ")) or "─" in line for line in err)  # click's own usage errors
    assert len(errors) == 1 or usage, f"{argv}: stderr was {err}"
    assert snapshot(work, inputs) == before, f"{argv} wrote files"
    assert not Path(READ_ONLY).exists()


def test_the_harness_tries_enough_inputs():
    assert len(CASES) >= 100
