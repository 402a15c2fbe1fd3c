"""The run folder (hybridvit.train.run_dir): an existing run is never overwritten unless asked, default
folders get a number, a failed start leaves no folder, and metrics.png keeps one colour per series."""
from __future__ import annotations

import pytest

from hybridvit.train import config as C
from hybridvit.train.run_dir import RunExistsError, created_run_dir, output_dir, prepare_output_dir


def test_an_existing_run_is_refused_unless_asked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"x")
    (run / "train.log").write_text("old run\n")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunExistsError, match="--overwrite") as e:
        prepare_output_dir(run)
    assert isinstance(e.value, ValueError) and f"--resume {run}" in str(e.value)
    assert prepare_output_dir(run, resume=True) == run and (run / "best.pt").exists()
    assert prepare_output_dir(run, overwrite=True) == run
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the old run's files only
    assert prepare_output_dir(tmp_path / "empty") == tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        prepare_output_dir(tmp_path / "missing", resume=True)


def test_default_run_folders_get_a_number(tmp_path):
    base = tmp_path / "runs" / "fastervit_nano-20250101-000000"
    assert prepare_output_dir(None, default=base) == base
    base.mkdir(parents=True)
    assert prepare_output_dir(None, default=base).name == base.name + "-2"


def test_a_failed_start_leaves_no_folder(tmp_path):
    with pytest.raises(ValueError, match="data"):
        with output_dir(tmp_path / "run") as out:
            (out / "train.log").write_text("header\n")
            raise ValueError("data check failed")
    assert not (tmp_path / "run").exists()
    with pytest.raises(RuntimeError):
        with created_run_dir(prepare_output_dir(tmp_path / "run2")) as out:
            (out / "last.pt").write_bytes(b"x")
            raise RuntimeError("crash after a checkpoint")
    assert (tmp_path / "run2" / "last.pt").exists()  # resumable: kept


def test_train_has_an_overwrite_option():
    from hybridvit.cli import build_parser
    assert build_parser().parse_args(["train", "--overwrite"]).overwrite is True
    assert C.make_config().overwrite is False


def test_metrics_plot_keeps_one_colour_per_series(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib", reason="needs matplotlib (train extra)")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from hybridvit.train.engine import plot_metrics

    figs = []
    save = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (figs.append(self), save(self, *a, **k))[1])
    rows = [{"epoch": i, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1), "train_top1": 50.0 + i,
             "val_top1": 40.0 + i, "val_top1_ema": 41.0 + i} for i in range(3)]
    plot_metrics(rows, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").is_file()
    colours: dict[str, set] = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            split = line.get_label().split()[0]  # train / val
            key = "ema" if "EMA" in line.get_label() else split
            colours.setdefault(key, set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert set(colours) == {"train", "val", "ema"}
    assert all(len(c) == 1 for c in colours.values())  # same colour in both panels
    assert len(set.union(*colours.values())) == 3
