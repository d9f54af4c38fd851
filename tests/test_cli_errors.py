"""User mistakes end in one line on stderr naming the problem and the fix, exit 2, before Ray
starts or anything is written."""

import pytest

from instructdiff_ray.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", ["instrutdiff", "randomm", "foo"])
def test_a_misspelled_strategy_is_refused_everywhere(name, tmp_path, capsys):
    import instructdiff_ray as idr
    from instructdiff_ray.config import ConfigError, SelectionConfig

    scores = tmp_path / "scores"
    scores.mkdir()
    assert main(["select", "--scores", str(scores), "--out", str(tmp_path / "sel"), "--strategy", name]) == 2
    line = _one_line(capsys)
    assert f"unknown strategy {name!r}" in line and "instructdiff" in line and "random" in line
    if name != "foo":
        assert "did you mean" in line
    assert not (tmp_path / "sel").exists()
    with pytest.raises(ConfigError, match="unknown strategy"):
        idr.select(str(scores), strategy=name)
    with pytest.raises(ValueError, match="unknown strategy"):
        SelectionConfig(strategy=name)


def test_out_that_is_a_file_is_refused(tmp_path, gsm8k, capsys):
    afile = tmp_path / "out.txt"
    afile.write_text("mine")
    assert main(["run", "--data", str(gsm8k), "--base", "smollm2", "--out", str(afile)]) == 2
    assert "is a file, not a directory" in _one_line(capsys)
    assert afile.read_text() == "mine"
    scores = tmp_path / "scores"
    scores.mkdir()
    assert main(["select", "--scores", str(scores), "--out", str(afile)]) == 2
    assert "is a file, not a directory" in _one_line(capsys)


def test_status_report_inspect_on_what_is_not_a_run_exit_2(tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    for cmd in ("status", "report", "inspect"):
        assert main([cmd, str(tmp_path / "folder")]) == 2
        assert "is not a run directory" in _one_line(capsys)
        assert main([cmd, str(tmp_path / "missing")]) == 2
        assert "does not exist" in _one_line(capsys)
    assert list((tmp_path / "folder").iterdir()) == []


def test_select_without_score_files_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["select", "--scores", str(tmp_path / "empty"), "--out", str(tmp_path / "sel")]) == 2
    assert "holds no score files" in _one_line(capsys)


def test_a_missing_or_misspelled_model_names_the_accepted_forms(tmp_path, gsm8k, capsys):
    args = ["run", "--data", str(gsm8k), "--out", str(tmp_path / "o"), "--dry-run"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert line.startswith("error: model: missing: the base model: --base MODEL") and "smollm2" in line
    assert main(args + ["--base", "smolm2"]) == 2
    line = _one_line(capsys)
    assert "smolm2 does not exist" in line and "Hugging Face Hub id" in line and "built-in name smollm2" in line
    assert not (tmp_path / "o").exists()


def test_pools_are_refused_for_the_hf_engine(tmp_path, gsm8k, capsys):
    assert main(["run", "--data", str(gsm8k), "--base", "smollm2", "--out", str(tmp_path / "o"),
                 "--set", "engine.placement=pools", "--dry-run"]) == 2
    assert "engine.placement: pools is for the vllm engine" in _one_line(capsys)


def test_set_takes_lists_and_words(tmp_path, gsm8k, capsys):
    """`--set 'data.paths=[...]'` sets a list; `--set progress=on` stays the word (YAML would read a boolean)."""
    import json

    args = ["run", "--data", str(tmp_path / "not-this.jsonl"), "--base", "smollm2", "--out", str(tmp_path / "o"),
            "--set", f"data.paths=[{gsm8k}]", "--set", "progress=on", "--limit", "10", "--dry-run"]
    assert main(args) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["files"] == [str(gsm8k)] and plan["rows"] == 10
    assert main(args[:-1] + ["--set", "data.paths=[unclosed", "--dry-run"]) == 2
    assert "--set data.paths: cannot read" in _one_line(capsys)


def test_an_unknown_input_format_is_one_line_naming_the_readers(tmp_path, gsm8k, capsys):
    args = ["run", "--data", str(gsm8k), "--base", "smollm2", "--out", str(tmp_path / "o"), "--set", "data.format=jsnl",
            "--dry-run"]
    assert main(args) == 2
    line = _one_line(capsys)
    assert "data.format: unknown format 'jsnl'" in line and "jsonl, json, parquet, csv, arrow" in line
    assert not (tmp_path / "o").exists()
