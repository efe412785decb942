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
