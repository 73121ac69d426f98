"""`pijepa bench trainer` runs the three rows at tiny shapes and reads the trainer's own timing."""

import json

from pijepa.bench.trainer import trainer_sets, trainer_step_s
from pijepa.cli import main as cli_main


def test_trainer_step_time_comes_from_the_timed_window(tmp_path):
    sets = trainer_sets("vit_tiny", 8, 32, 4, 1, 48, 0, 3, tmp_path / "run")
    step_s = trainer_step_s([*sets, "mask.min_keep=2"], 3)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "6"]  # the warm-up log, then the timed one
    header = rows[0].split(",")
    assert step_s == float(rows[2].split(",")[header.index("step_time_s")]) > 0


def test_bench_trainer_cli(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = cli_main(["bench", "trainer", "--model", "vit_tiny", "--patch", "8", "--img", "64", "--batch", "4",
                     "--pred-depth", "1", "--pred-dim", "48", "--workers", "0", "--steps", "2", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "pijepa train / bench step:" in text
    r = json.loads(out.read_text())
    assert [row["what"].split(" (")[0] for row in r["rows"]] == ["baseline", "bench step", "pijepa train"]
    assert r["rows"][0]["vs_baseline"] == 1.0
    assert r["trainer_vs_bench_step"] == r["rows"][1]["step_s"] / r["rows"][2]["step_s"]
