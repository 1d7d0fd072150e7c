"""Regression tests for issue 11 (files): `--overwrite`, `bench --fresh` and `overwrite=True` replace only
folders svdkit wrote, never the current or home directory or an ancestor of the current directory; a torn
last line of metrics.jsonl does not break a resume."""

from __future__ import annotations

import pytest

import svdkit
from svdkit.cli import main as cli_main
from svdkit.core.files import MARKER, atomic_dir
from svdkit.training import report

from conftest import tiny_model


def _user_folder(path):
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("years of work")
    return path


def _intact(path) -> bool:
    return (path / "thesis.tex").read_text() == "years of work"


# -- the central rule: atomic_dir ----------------------------------------------------------------------------
def test_atomic_dir_replaces_only_a_folder_svdkit_wrote(tmp_path):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / MARKER).is_file()  # every output folder carries the marker
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert not (out / "a.txt").exists() and (out / "b.txt").is_file()
    mine = _user_folder(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="svdkit did not write it"):
        with atomic_dir(mine, overwrite=True):
            pass
    assert _intact(mine) and not list(tmp_path.glob(".mine.tmp-*"))


@pytest.mark.parametrize("where", ["cwd", "ancestor", "home"])
def test_atomic_dir_never_replaces_the_current_or_home_directory(where, tmp_path, monkeypatch):
    work = tmp_path / "home" / "work"
    with atomic_dir(work) as tmp:
        (tmp / "thesis.tex").write_text("years of work")
    (tmp_path / "home" / MARKER).write_text("")  # even a folder that looks svdkit-written
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    target = {"cwd": ".", "ancestor": str(tmp_path), "home": str(tmp_path / "home")}[where]
    what = {"cwd": "the current directory", "ancestor": "an ancestor of the current directory",
            "home": "the home directory"}[where]  # fmt: skip
    with pytest.raises(FileExistsError, match=f"refusing to replace .*it is {what}"):
        with atomic_dir(target, overwrite=True):
            pass
    assert _intact(work)


def test_home_itself_is_refused_when_it_is_not_an_ancestor(tmp_path, monkeypatch):
    home = tmp_path / "home"
    with atomic_dir(home) as tmp:
        pass
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="it is the home directory"):
        with atomic_dir(home, overwrite=True):
            pass


# -- every entry point ---------------------------------------------------------------------------------------
def test_finetune_overwrite_refuses_the_current_directory_and_unmarked_folders(tiny_run_inputs, tmp_path, monkeypatch):
    from svdkit.training.finetune import FinetuneConfig, _prepare_out, finetune

    model, data = tiny_run_inputs
    cfg = FinetuneConfig(model=str(model), data=str(data), steps=1)
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    with pytest.raises(FileExistsError, match="it is the current directory"):
        finetune(cfg, ".", overwrite=True, progress=False)
    with pytest.raises(FileExistsError, match="svdkit did not write it"):
        finetune(cfg, _user_folder(tmp_path / "notes"), overwrite=True, progress=False)
    assert _intact(work) and _intact(tmp_path / "notes")
    _prepare_out(tmp_path / "run", cfg, resume=False, overwrite=False)  # a run folder svdkit made: replaceable
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    _prepare_out(tmp_path / "run", cfg, resume=False, overwrite=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and (tmp_path / "run" / MARKER).is_file()


def test_finetune_cli_overwrite_of_the_current_directory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    assert cli_main(["finetune", "--out", ".", "--overwrite", "--steps", "1"]) == 2
    assert "refusing to replace" in capsys.readouterr().err and _intact(work)


def test_bench_fresh_deletes_only_a_bench_folder_svdkit_wrote(tmp_path, monkeypatch):
    from svdkit.benchmarking import bench

    mine = _user_folder(tmp_path / "mine")
    with pytest.raises(FileExistsError, match="svdkit did not write it"):
        bench(mine, fresh=True, methods=("lora",))
    monkeypatch.chdir(mine)
    with pytest.raises(FileExistsError, match="it is the current directory"):
        bench(".", fresh=True, methods=("lora",))
    assert _intact(mine)


def test_save_adapter_and_export_peft_overwrite_only_their_own_folders(tmp_path):
    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(rank=2, targets="q_proj"))
    for write in (svdkit.save_adapter, svdkit.export_peft):
        mine = _user_folder(tmp_path / f"mine-{write.__name__}")
        with pytest.raises(FileExistsError, match="svdkit did not write it"):
            write(model, mine, overwrite=True)
        assert _intact(mine)
        own = tmp_path / f"own-{write.__name__}"
        write(model, own)
        write(model, own, overwrite=True)  # its own earlier output: replaced
        assert (own / MARKER).is_file()


def test_demo_overwrite_refuses_the_current_directory(tiny_run_inputs, tmp_path, monkeypatch, capsys):
    work = _user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    code = cli_main(["demo", "--model", str(tiny_run_inputs[0]), "--rank", "2", "--out", ".", "--overwrite"])
    assert code == 2 and "it is the current directory" in capsys.readouterr().err and _intact(work)


# -- metrics.jsonl: a torn last line (SIGKILL mid-write) ----------------------------------------------------
def test_a_torn_metrics_line_is_skipped_and_the_next_row_starts_on_its_own_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    for step in (1, 2):
        report.append_metrics(path, {"step": step, "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 0.3')  # killed mid-write
    assert [r["step"] for r in report.read_metrics(path)] == [1, 2]
    report.truncate_metrics(path, 2)  # what --resume does: no crash, torn line gone
    assert path.read_text().count("\n") == 2
    with open(path, "a") as f:
        f.write('{"step": 3, "lo')
    report.append_metrics(path, {"step": 3, "loss": 0.3})
    assert [r["step"] for r in report.read_metrics(path)] == [1, 2, 3]
    path.write_text('{"step": 1}\nnot json at all\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        report.read_metrics(path)

