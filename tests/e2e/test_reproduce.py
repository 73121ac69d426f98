"""`pijepa reproduce --smoke`: the whole pipeline (shards, train, export, features, eval, report) end to end."""

import json

import pytest
import torch

from tests.conftest import run_cli

ENCODERS = ("random init", "I-JEPA (L2)", "Prob. I-JEPA (L2_PKT)")
DATASETS = ("cifar10", "intel-scenes")


@pytest.mark.slow
def test_reproduce_smoke_writes_table_and_plots(tmp_path, data_dir):
    out, docs = tmp_path / "out", tmp_path / "docs"
    args = ["reproduce", "--smoke", "--seeds", "0", "--jobs", "2", "--out", str(out), "--docs", str(docs),
            "--data", str(data_dir)]
    r = run_cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # --jobs 2: both pretraining runs start before either finishes.
    lines = r.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if "[train/" in line and line.endswith("] ...")]
    ends = [i for i, line in enumerate(lines) if "[train/" in line and "] done in" in line]
    assert len(starts) == 2 and len(ends) == 2 and max(starts) < min(ends), r.stderr[-3000:]

    md = (docs / "results.md").read_text()
    for png in ("results_loss_curves.png", "results_accuracy.png"):
        assert (docs / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert "pijepa reproduce" in md and "2 run(s) at a time" in md and "--jobs 2" in md and "fp32 on CPU" in md
    # The accuracy table: one row per encoder x dataset, three metrics each, "mean ± spread".
    rows = [line for line in md.splitlines()
            if line.startswith("| ") and any(line.startswith(f"| {e} | {d} |") for e in ENCODERS for d in DATASETS)]
    assert len(rows) == len(ENCODERS) * len(DATASETS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5 and all(" ± " in c for c in cells[2:]), row
    assert "L2_PKT − L2" in md

    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"random", "L2", "L2_PKT"}
    for enc in results.values():
        for ds in DATASETS:
            assert set(enc[ds]) == {"knn20", "knn5", "linear"}
            assert all(len(v) == 1 and 0.0 <= v[0] <= 100.0 for v in enc[ds].values())

    # A rerun skips every stage (all outputs exist) and only rewrites the report.
    timings = json.loads((out / "timings.json").read_text())
    r = run_cli(*args, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[train/" not in r.stderr and "[features/" not in r.stderr
    assert json.loads((out / "timings.json").read_text())["train/L2_s0"] == timings["train/L2_s0"]

    # commands.sh lists exactly the argv each stage ran: every training log starts with its line.
    script = (out / "commands.sh").read_text().splitlines()
    assert any(line.startswith("pijepa train --config cifar10_reproduce ") for line in script)
    for run in ("L2_s0", "L2_PKT_s0"):
        ran = (out / "runs" / run / "train.log").read_text().splitlines()[0].removeprefix("$ ")
        assert ran in script, ran
    for kind in ("pijepa shards write ", "pijepa export ", "pijepa features ", "pijepa eval knn ",
                 "pijepa eval linear "):
        assert any(line.startswith(kind) for line in script), kind

    # Without --docs the report goes to --out (never into the repository's docs/).
    r = run_cli(*args[:-4], "--data", str(data_dir), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "results.md").is_file() and (out / "results_accuracy.png").is_file()
    assert "[train/" not in r.stderr


def test_reproduce_missing_data_is_one_line(tmp_path):
    missing = tmp_path / "nothing"
    r = run_cli("reproduce", "--smoke", "--out", str(tmp_path / "out"), "--data", str(missing), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"pijepa reproduce: error: {missing}: no such folder (--data names the folder "
                                "holding cifar10/ and intel-scenes/; default ../shared/data)"), r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_reproduce_device_cuda_without_cuda_fails_before_any_work(tmp_path, data_dir):
    out = tmp_path / "out"
    r = run_cli("reproduce", "--smoke", "--device", "cuda", "--out", str(out), "--data", str(data_dir), timeout=120)
    assert r.returncode != 0
    assert "--device cuda" in r.stderr and "no CUDA device" in r.stderr, r.stderr[-2000:]
    assert not (out / "shards").exists() and not (out / "runs").exists()


def test_reproduce_arms_parser():
    """--arms: the known names in order, weights as run names, duplicates dropped; anything else is a
    one-line ConfigError naming --arms."""
    from pijepa.commands.reproduce.arms import parse_arms
    from pijepa.runtime.errors import ConfigError

    requests = parse_arms("L2, L2_PKT_chunks,L2_PKT,L2_PKT@published,L2_PKT@1e3,L2_PKT@1000,L2_PKT@3e4,L2_PKT@0.5")
    assert [r.key for r in requests] == ["L2", "L2_PKT_chunks", "L2_PKT", "L2_PKT@published", "L2_PKT@1000",
                                         "L2_PKT@30000", "L2_PKT@0.5"]
    assert [r.weight for r in requests] == [None, None, None, None, 1000.0, 30000.0, 0.5]
    assert [r.published for r in requests] == [False, False, False, True, False, False, False]
    for bad in ("L3", "l2", "L2_PKT@", "L2_PKT@x", "L2_PKT@-1", "L2_PKT@nan", "L2_PKT@inf", "L2@1e3", ",", ""):
        with pytest.raises(ConfigError) as e:
            parse_arms(f"L2,{bad}" if bad not in (",", "") else bad)
        assert str(e.value).startswith("--arms ") and "\n" not in str(e.value), bad


def test_reproduce_bad_arm_is_one_line_before_any_work(tmp_path, data_dir):
    out = tmp_path / "out"
    r = run_cli("reproduce", "--smoke", "--arms", "L2,L2_PKT@heavy", "--out", str(out), "--data", str(data_dir),
                timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("pijepa reproduce: error: --arms 'L2,L2_PKT@heavy': 'L2_PKT@heavy' needs a "
                                "pkt_weight >= 0 after '@' (e.g. L2_PKT@1e3) or 'published'"), r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_reproduce_intel_scenes_arms_shares_and_verdicts(tmp_path, data_dir):
    """--pretrain intel-scenes with four arms: every arm trained and evaluated on both test sets, the
    report's PKT-share table and verdict lines, the published balance computed at the run's shapes."""
    from pijepa.config import load_config
    from pijepa.losses.balance import published_pkt_weight
    from pijepa.masks.multiblock import mean_block_area

    out = tmp_path / "out"
    arms = ("L2", "L2_PKT_chunks", "L2_PKT@published", "L2_PKT@1000")
    r = run_cli("reproduce", "--smoke", "--pretrain", "intel-scenes", "--arms",
                "L2,L2_PKT_chunks,L2_PKT@published,L2_PKT@1e3", "--seeds", "0", "--jobs", "2", "--out", str(out),
                "--data", str(data_dir), timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    shards = json.loads((out / "shards" / "shards.json").read_text())
    assert shards["num_classes"] == 6 and shards["sources"][0]["path"].endswith("intel-scenes/train")

    record = json.loads((out / "results.json").read_text())
    assert record["pretrain"] == "intel-scenes"
    assert set(record["results"]) == {"random", *arms}
    for enc in record["results"].values():
        for ds in DATASETS:
            assert set(enc[ds]) == {"knn20", "knn5", "linear"}
    # The published balance at the smoke run's shapes (cifar10_reproduce at the smoke batch of 8).
    cfg = load_config("cifar10_reproduce", ["data.batch_size=8"])
    grid = (cfg.data.crop_size // cfg.mask.patch_size,) * 2
    tokens = mean_block_area(tuple(cfg.mask.pred_mask_scale), tuple(cfg.mask.aspect_ratio), grid)
    expected = published_pkt_weight(8, cfg.mask.num_pred_masks, tokens, cfg.optimization.pkt_chunk_size)
    assert record["published_pkt_weight"]["weight"] == pytest.approx(expected, rel=1e-9)
    ran = load_config(out / "runs" / "L2_PKT@published_s0" / "config.yaml")
    assert ran.optimization.loss_function == "L2_PKT" and ran.optimization.pkt_weight == pytest.approx(expected)
    assert record["arms"]["L2_PKT@1000"]["pkt_weight"] == 1000.0
    assert record["arms"]["L2_PKT_chunks"]["pkt_weight_as_L2_PKT"] == pytest.approx(expected)
    # PKT's gradient share, read from each run's metrics.csv: none for L2, a fraction for the others.
    diags = record["diagnostics"]
    assert diags["L2"]["grad_share_pkt"] == [] and len(diags["L2"]["target_rank"]) == 1
    assert all(len(diags[a]["grad_share_pkt"]) == 1 and 0 < diags[a]["grad_share_pkt"][0] < 1 for a in arms[1:])
    assert diags["L2_PKT@1000"]["grad_share_pkt"][0] > diags["L2_PKT@published"]["grad_share_pkt"][0]

    md = (out / "results.md").read_text()
    assert "pretrained on intel-scenes" in md and f"**{expected:.4g}**" in md
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| arm | loss | pkt_weight"))
    header, rows = lines[start], lines[start + 2:start + 2 + len(arms) + 1]
    assert "PKT share of the gradient" in header and "final target_rank" in header
    assert all(f"{ds} test" in header for ds in DATASETS)
    shares = {row.split("|")[1].strip(): [c.strip() for c in row.strip("|").split("|")] for row in rows}
    assert list(shares) == [*arms, "random"]
    assert shares["L2"][3] == "— (no PKT term)" and shares["L2_PKT@1000"][3].endswith("%")
    assert shares["L2_PKT@1000"][2] == "1000" and all(len(cells) == 7 for cells in shares.values())
    # One verdict line per comparison, computed (one seed: no claim), each arm vs L2 and vs random.
    for cand in arms[1:]:
        assert f"Verdict {cand} vs L2: **no clear difference can be stated from one seed**" in md
    for cand in arms:
        assert f"Verdict {cand} vs random: " in md
    verdicts = {(c["base"], c["candidate"]) for c in record["comparisons"]}
    assert verdicts == {("L2", a) for a in arms[1:]} | {("random", a) for a in arms}
