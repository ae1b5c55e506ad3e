"""Config, training loop (fake simulator), resume, CLI and DDP on 2 gloo processes."""
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from edge_app.cli import main as pocus
from helpers_training import fake_factory
from training import data as D
from training.train import TrainConfig, load_config, lr_at, run_training

TINY = ["model=pocusnet_tiny", "input_size=32", "batch_size=16", "workers=0", "augment_p=0.3", "threads=1",
        "val_patients=2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    D.write_dataset(root, "train", 4, 24, workers=1, size=32, probe_factory=fake_factory, progress=False)
    D.write_dataset(root, "val", 2, 16, workers=1, size=32, probe_factory=fake_factory, progress=False)
    return root


def test_config_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 7\nlr: 0.01\nmodel_kwargs: {dropout: 0.2}\n")
    cfg = load_config(path, ["lr=3e-4", "amp=false", "name=x"])
    assert (cfg.epochs, cfg.lr, cfg.amp, cfg.name, cfg.model_kwargs) == (7, 3e-4, False, "x", {"dropout": 0.2})
    assert cfg.batch_size == TrainConfig().batch_size
    assert isinstance(load_config(None, ["lr=1"]).lr, float)


@pytest.mark.parametrize("overrides, match", [(["epoch=3"], "unknown config key 'epoch'.*valid keys"),
                                              (["epochs"], "key=value"),
                                              (["epochs=many"], "epochs.*int"),
                                              (["amp=1"], "true/false")])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("bogus_key: 1\n")
    with pytest.raises(ValueError, match="bogus_key.*bad.yaml"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert load_config(path).model


def test_lr_schedule():
    cfg = TrainConfig(lr=1.0, warmup_frac=0.1, min_lr_frac=0.0)
    assert lr_at(cfg, 0.05) == pytest.approx(0.5) and lr_at(cfg, 0.1) == pytest.approx(1.0)
    assert lr_at(cfg, 1.0) == pytest.approx(0.0, abs=1e-9) and lr_at(cfg, 0.55) == pytest.approx(0.5)


def test_few_steps_reduce_loss_on_a_fixed_batch():
    from training.metrics import multitask_loss
    from training.models import create_model

    torch.manual_seed(0)
    arrays = D.arrays_from_shard(D.render_patient(1, 32, size=32, probe_factory=fake_factory))
    x, t = next(iter(torch.utils.data.DataLoader(D.FrameDataset(arrays, size=32), batch_size=32)))
    model = create_model("pocusnet_tiny")
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    w = {"view": 1.0, "quality": 1.0, "action": 1.0, "pose": 1.0}
    losses = []
    for _ in range(30):
        loss, _ = multitask_loss(model(x), t, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_train_writes_run_folder_and_checkpoint(tmp_path, shards):
    cfg = load_config(None, TINY + [f"data_dir={shards}", "epochs=2", f"out_dir={tmp_path}", "name=r",
                                    f"ship_dir={tmp_path / 'ship'}"])
    run = run_training(cfg, fake_factory, progress=False)
    for f in ("config.yaml", "last.pt", "best.pt", "metrics.csv", "metrics.json", "loss_curves.png", "confusion.png"):
        assert (run / f).is_file(), f
    assert yaml.safe_load((run / "config.yaml").read_text())["data_dir"] == str(shards)
    hist = json.loads((run / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1] and all(h["images_per_s"] > 0 for h in hist)
    ck = torch.load(run / "best.pt", weights_only=False)
    assert ck["model_name"] == "pocusnet_tiny" and ck["input_size"] == 32 and "view_acc" in ck["metrics"]
    shipped = torch.load(tmp_path / "ship" / "default.pt", weights_only=False)
    assert shipped["optimizer"] is None and "train_state" not in shipped
    shipped_config = (tmp_path / "ship" / "default.yaml").read_text()
    assert shipped_config.startswith("# The settings of the run that made this checkpoint")   # a record, says so
    assert yaml.safe_load(shipped_config)["data_dir"] == str(shards)
    assert json.loads((tmp_path / "ship" / "default_metrics.json").read_text())["config_hash"] == ck["config_hash"]


def test_resume_restores_the_same_state(tmp_path, shards):
    base = TINY + [f"data_dir={shards}", f"out_dir={tmp_path}"]
    straight = run_training(load_config(None, base + ["epochs=2", "name=a"]), fake_factory, progress=False)
    run_training(load_config(None, base + ["epochs=2", "epochs_per_run=1", "name=b"]), fake_factory, progress=False)
    assert torch.load(straight.parent / "b" / "last.pt", weights_only=False)["epoch"] == 0  # interrupted
    resumed = run_training(load_config(None, base + ["epochs=2", "name=b", "resume=auto"]), fake_factory,
                           progress=False)
    a = torch.load(straight / "last.pt", weights_only=False)
    b = torch.load(resumed / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 1 and a["train_state"]["step"] == b["train_state"]["step"]
    for k, v in a["state_dict"].items():
        assert torch.allclose(v.float(), b["state_dict"][k].float(), atol=1e-6), k
    assert len(b["train_state"]["history"]) == 2


def test_train_on_the_fly_stream(tmp_path):
    cfg = load_config(None, TINY + ["epochs=1", "train_patients=3", "frames_per_patient=16", f"out_dir={tmp_path}",
                                    "val_frames_per_patient=8", "time_limit_min=5"])
    run = run_training(cfg, fake_factory, progress=False)
    assert json.loads((run / "metrics.json").read_text())[0]["step"] == 3  # 48 frames / 16


def test_train_on_the_fly_with_loop_poses(tmp_path, shards):
    np.savez(tmp_path / "loop.npz", view=np.array([0, 3]), offset=np.array([[5.0, 0, 0, 0, 0], [0, 0, 9.0, 0, 0]]))
    base = TINY + ["epochs=1", "train_patients=2", "frames_per_patient=16", f"out_dir={tmp_path}",
                   "val_frames_per_patient=8", f"loop_poses={tmp_path / 'loop.npz'}", "loop_pose_share=0.5"]
    run = run_training(load_config(None, base), fake_factory, progress=False)
    assert json.loads((run / "metrics.json").read_text())[0]["step"] == 2
    with pytest.raises(ValueError, match="on-the-fly"):
        run_training(load_config(None, base + [f"data_dir={shards}"]), fake_factory, progress=False)
    with pytest.raises(ValueError, match="not an .npz"):
        run_training(load_config(None, base[:-2] + [f"loop_poses={tmp_path / 'missing.npz'}"]), fake_factory,
                     progress=False)


def test_cli_errors_are_one_line(capsys, tmp_path):
    assert pocus(["train", "epoch=3"]) == 1
    assert "unknown config key 'epoch'" in capsys.readouterr().err
    assert pocus(["val", "--weights", str(tmp_path / "none.pt")]) == 1
    assert "none.pt does not exist" in capsys.readouterr().err
    assert pocus(["train", "--print-config", "epochs=4"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["epochs"] == 4


def test_val_cli_on_shards(capsys, tmp_path, shards):
    run = run_training(load_config(None, TINY + [f"data_dir={shards}", "epochs=1", f"out_dir={tmp_path}"]),
                       fake_factory, progress=False)
    assert pocus(["val", "--weights", str(run / "best.pt"), "--data", str(shards / "val"), "--json",
                  "--out", str(tmp_path / "ev")]) == 0
    res = json.loads(capsys.readouterr().out)
    m = res["sets"]["val"]
    assert m["n_frames"] == 32 and 0 <= m["view_acc"] <= 1 and len(m["confusion"]) == 6
    assert (tmp_path / "ev" / "confusion_val.png").is_file()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, overrides):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    run_training(load_config(None, overrides), fake_factory, progress=False)
    # Leave without the interpreter's shutdown: once in a loaded CI-like run a rank died with SIGABRT
    # ("terminate called without an active exception", a C++ thread torn down at exit) after training
    # had finished. A failure inside run_training still raises above and fails the test.
    os._exit(0)


@pytest.mark.slow  # two fresh torch processes: ~10-20 s on a busy 2-core CPU
def test_ddp_two_gloo_processes(tmp_path, shards):
    overrides = TINY + [f"data_dir={shards}", "epochs=1", f"out_dir={tmp_path}", "name=ddp", "device=cpu"]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), overrides), nprocs=2, join=True)
    ck = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    # 96 frames split over 2 ranks: 48 each -> 3 steps of 16 (single process would take 6)
    assert ck["train_state"]["step"] == 3
    assert all(torch.isfinite(v.float()).all() for v in ck["state_dict"].values())


def test_val_cli_on_a_real_dataset_folder(capsys, tmp_path, shards):
    import cv2
    import numpy as np

    run = run_training(load_config(None, TINY + [f"data_dir={shards}", "epochs=1", f"out_dir={tmp_path}"]),
                       fake_factory, progress=False)
    data = tmp_path / "real"
    data.mkdir()
    for i in range(3):
        cv2.imwrite(str(data / f"{i}.png"), np.full((40, 60), 50 * i, np.uint8))
    (data / "labels.csv").write_text("file,view,quality\n0.png,A4C,0.7\n1.png,PLAX,\n2.png,OTHER,\n")
    assert pocus(["val", "--weights", str(run / "best.pt"), "--data", str(data), "--split", "all", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)["sets"]["generic"]
    assert m["n_frames"] == 3 and "action_acc" not in m and "pose_mae" not in m  # no pose labels on real data
    assert np.array(m["confusion"]).sum() == 3


def test_bench_train_reports_step_and_data_rates(capsys):
    from edge_app.cli import main

    assert main(["bench", "train", "--model", "pocusnet_tiny", "--device", "cpu", "--batch-size", "4",
                 "--steps", "2", "--frames", "8", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["device"] == "cpu" and row["train_images_per_s"] > 0 and row["data_frames_per_s_per_worker"] > 0
