import json

from typer.testing import CliRunner

from ernielab.cli.main import app


def test_eval_command_writes_report_and_sheet(tiny_pipeline_dir, tmp_path):
    res = CliRunner().invoke(app, ["image", "eval", "--model", str(tiny_pipeline_dir), "--n-fid", "6", "--n-align", "3",
                                   "--steps", "2", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["fid_kid"]["n_real"] == report["fid_kid"]["n_fake"] == 6
    assert report["fid_kid"]["fid"] > 0  # random weights draw nothing like shapes
    assert set(report["alignment"]) == {"single", "count", "relation"}
    for kind, result in report["alignment"].items():
        assert result["n"] == 3 and 0 <= result["overall"]["all"] <= 1
    assert report["generation"]["images"] == 6 + 9
    assert (tmp_path / "contact_sheet.png").stat().st_size > 0


def test_paraphrase_and_compositional_alignment(tiny_pipeline_dir):
    from ernielab.image.evaluate import ImageDrawer, compositional_alignment, paraphrase_alignment
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.worlds.phrasing import EVAL_STYLES, template_twins

    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    draw = ImageDrawer(pipe, 32, steps=2, batch_size=4, progress=False)
    report, sheets = paraphrase_alignment(draw, n=5, seed=1, kinds=("single", "relation"))
    assert set(report) == {"single", "relation"}
    for kind, result in report.items():
        assert result["template"]["n"] == result["paraphrase"]["n"] == 5
        assert sum(result["paired_all"].values()) == 5
        assert set(result["by_style"]) <= set(EVAL_STYLES)
        assert sum(r["paraphrase"]["n"] for r in result["by_style"].values()) == 5
        assert [s["template"] for s in result["sample"]] == [t for t, _, _ in template_twins(kind, 5, seed=1)]
    assert report["relation"]["template"]["relation"] is not None and report["single"]["template"]["relation"] is None
    texts, images = sheets["single paraphrase"]
    assert len(texts) == len(images) == 5 and texts[0] != sheets["single template"][0][0]
    assert draw.timing["images"] == 20

    comp = compositional_alignment(draw, ["red triangle left of"], n=3, seed=0)
    assert comp["heldout"]["n"] == comp["seen"]["n"] == 3
    assert all("red triangle" in t for t in comp["heldout"]["sample"])
    assert 0 <= comp["heldout"]["all"] <= 1


def test_eval_reports_paraphrase_and_compositional_sections(tiny_pipeline_dir, tmp_path):
    from ernielab.image.evaluate import evaluate
    from ernielab.image.pipeline import TextToImagePipeline
    from ernielab.worlds.registry import DataConfig

    pipe = TextToImagePipeline.from_pretrained(tiny_pipeline_dir)
    data = DataConfig(holdout_combinations=["blue circle above"])
    report = evaluate(pipe, data, n_fid=0, n_align=2, steps=1, batch_size=8, progress=False, n_paraphrase=2)
    assert set(report["paraphrase"]) == {"single", "count", "relation"}
    assert report["compositional"]["holdout_combinations"] == ["blue circle above"]
    assert report["generation"]["images"] == 3 * 2 + 3 * 2 * 2 + 2 * 2
