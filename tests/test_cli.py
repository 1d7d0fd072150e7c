"""The command line, and the promise that `import svdkit` needs only torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import svdkit
from svdkit.cli import main


def test_methods_table(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in svdkit.methods():
        assert f"\n{name} " in out
    assert "arxiv.org/abs/2404.02948" in out and "r(m+n)" in out


def test_import_needs_only_torch():
    code = ("import sys, svdkit; heavy = {'transformers', 'peft', 'safetensors', 'matplotlib', 'gguf', 'accelerate'}"
            " & set(sys.modules); print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_bad_input_exits_2_with_a_message(capsys, tmp_path):
    assert main(["demo", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    assert "svdkit: error: unknown model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.real_model
def test_demo_on_the_default_model(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["demo", "--out", str(out), "--targets", r"layers\.0\.", "--svd", "randomized", "--steps", "2"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # fp32 relative errors of ~1e-5 depend on the BLAS and thread count: compare with the demo's own 1e-4, well away
    assert report["passed"] and report["init_error"] <= 1e-4 and report["reload_error"] == 0.0
    assert report["peft_error"] <= 1e-4 and report["merge_error"] <= 1e-4
    assert report["trainable_parameters"] == 16 * (2 * (576 + 576) + 2 * (192 + 576) + 3 * (1536 + 576))
    assert (out / "adapter" / "svdkit.json").is_file() and (out / "peft" / "adapter_config.json").is_file()
    assert main(args) == 2  # never overwrites an existing run unless told to
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


@pytest.mark.real_model
def test_readme_example_runs(tmp_path, monkeypatch):
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, re.S)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "adapter" / "svdkit.json").is_file()
    assert (tmp_path / "out" / "peft" / "adapter_model.safetensors").is_file()
    assert not any(type(m).__name__ == "SpectralLinear" for m in namespace["model"].modules())
