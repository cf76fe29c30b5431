"""`loopcoder export`: a copy or the directory itself gets the remote-code files; one-line errors, exit 2."""

from __future__ import annotations

import json

from loopcoder.cli import main
from loopcoder.export import AUTO_MAP, remote_code_files
from support.models import released_style_dir


def test_export_to_a_copy_and_in_place(tmp_path, capsys):
    src = tmp_path / "released"
    src.mkdir()
    released_style_dir(src)
    assert main(["export", "--model", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "modeling_loopcoder.py" in capsys.readouterr().out
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == sorted([*remote_code_files(), "config.json", "model.safetensors"])
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    assert not list(src.glob("*.py"))  # the source is untouched
    assert (out / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert main(["export", "--model", str(src), "--in-place"]) == 0
    assert sorted(p.name for p in src.glob("*.py")) == sorted(remote_code_files())


def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/config.json").write_text(json.dumps({"model_type": "iquestpltcoder", "plt_num_loops": 0}))
    (tmp_path / "bad/model.safetensors").write_bytes(b"")
    assert main(["export", "--model", str(tmp_path / "bad"), "--in-place"]) == 2
    assert "plt_num_loops" in capsys.readouterr().err
