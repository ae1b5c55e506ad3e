"""`pocus sim gallery` and `pocus sim bench`."""
import json

import cv2

from edge_app.cli import main


def test_gallery_writes_a_captioned_grid(tmp_path):
    out = tmp_path / "g.png"
    assert main(["sim", "gallery", "--out", str(out), "--patients", "1", "--size", "64", "--off-target", "1"]) == 0
    img = cv2.imread(str(out), cv2.IMREAD_GRAYSCALE)
    assert img is not None and img.shape[1] == 6 * (64 + 4)   # five views + one off-target tile
    assert img[64:, :64].max() == 255                          # caption text under the tile


def test_gallery_bad_arguments_are_one_line_errors(tmp_path, capsys):
    assert main(["sim", "gallery", "--out", str(tmp_path / "g.png"), "--patients", "0"]) == 1
    assert "patients" in capsys.readouterr().err
    assert main(["sim", "gallery", "--out", str(tmp_path / "g.png"), "--size", "8", "--patients", "1"]) == 1


def test_bench_json(capsys):
    assert main(["sim", "bench", "--size", "64", "--frames", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    row = res["sizes"][0]
    assert row["size_px"] == 64 and row["render_fps"] > 0 and row["remap_floor_fps"] > row["render_fps"]
    assert res["rss_mb_per_extra_patient"] < 300


def test_bench_is_also_pocus_bench_sim(capsys):
    assert main(["bench", "sim", "--size", "64", "--frames", "5"]) == 0
    assert "render fps" in capsys.readouterr().out
