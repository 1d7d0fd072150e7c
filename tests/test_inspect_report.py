"""`svdkit inspect` end to end on tiny models: the three files, a fine-tuned run compared with its base, the
data signals checked against their formulas, and report.html rendered by a real headless browser."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch

import svdkit
from svdkit.cli import main
from svdkit.inspection.signals import gradient_spectrum, matrix_nuclear_norm, nuclear_norm_score
from tests.conftest import calibration_batches, perturb_adapters, tiny_model


@pytest.fixture(scope="module")
def inspected(tiny_run_inputs, tmp_path_factory):
    """A fake finished run (svdkit adapter on the tiny Llama) inspected with --data: (out folder, json)."""
    from svdkit.training.finetune import FinetuneConfig

    model_dir, data_file = tiny_run_inputs
    root = tmp_path_factory.mktemp("inspect")
    run = root / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(FinetuneConfig(model=str(model_dir), method="lora", rank=4).to_dict()))
    model, _ = svdkit.load_model(model_dir)
    svdkit.adapt(model, svdkit.config("lora", rank=4))
    perturb_adapters(model, scale=0.3)
    svdkit.save_adapter(model, run / "adapter")
    out = root / "report"
    assert main(["inspect", str(run), "--data", str(data_file), "--samples", "4", "--out", str(out)]) == 0
    return out, json.loads((out / "spectrum.json").read_text())


def test_inspect_writes_the_three_files_for_a_finetuned_run(inspected):
    out, doc = inspected
    assert {p.name for p in out.iterdir()} >= {"spectrum.csv", "spectrum.json", "report.html"}
    rows = doc["rows"]
    assert len(rows) == 15 and doc["summary"]["matrices"] == 15 and doc["summary"]["heads"] == 1
    adapted = [r for r in rows if r["kind"] == "svdkit-adapter"]
    assert adapted and all(r["has_base"] and r["delta_sigma_max"] > 0 for r in adapted)
    assert set(doc["recommendations"]["ranks"]) == {r["name"] for r in rows}
    assert doc["summary"]["intruders_by_eps"]["0.9"] >= doc["summary"]["intruders_by_eps"]["0.5"]
    header = (out / "spectrum.csv").read_text().splitlines()[0].split(",")
    assert {"alpha", "effective_rank", "mp_spikes", "intruders", "rank_90"} <= set(header)
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html  # self-contained
    assert html.count("data:image/png;base64,") >= 6 and "Recommendations" in html
    signals = doc["signals"]
    assert signals["examples"] == 4 and len(signals["gradient_spectrum"]) == 15  # the adapter merged first
    assert signals["nuclear_norm_score"]["mnn"] > 0


@pytest.fixture
def plots_skipped(monkeypatch):
    """The plots cost ~1 s of CPU each; tests that read spectrum.json only get a one-line report.html (the
    full page is checked by the fixture-based tests above and rendered by Chromium below)."""
    import svdkit.inspection.report as report

    monkeypatch.setattr(report, "render_html", lambda rows, meta, signals=None: "<!DOCTYPE html><html></html>")


def test_inspect_compares_a_plain_model_with_its_base(tiny_run_inputs, tmp_path, plots_skipped):
    model_dir, _ = tiny_run_inputs
    model, tok = svdkit.load_model(model_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))
    model.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    assert main(["inspect", str(tmp_path / "ft"), "--base", str(model_dir), "--out", str(tmp_path / "o"), "--k", "4"]) == 0
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"spectrum.csv", "spectrum.json", "report.html"}
    rows = {r["name"]: r for r in json.loads((tmp_path / "o" / "spectrum.json").read_text())["rows"]}
    assert rows["model.layers.0.self_attn.q_proj"]["delta_rel_fro"] > 1
    assert rows["model.layers.1.self_attn.q_proj"]["delta_sigma_max"] == 0 and rows["model.layers.1.self_attn.q_proj"]["intruders"] == 0
    assert main(["inspect", str(tmp_path / "ft"), "--out", str(tmp_path / "o")]) == 2  # exists: refused, one line


def test_gradient_spectrum_and_nuclear_norm_match_their_formulas():
    model = tiny_model("llama")
    batches = calibration_batches(2)
    model.model.embed_tokens.weight.requires_grad_(False)
    rows = {r["name"]: r for r in gradient_spectrum(model, batches, progress=False)}
    assert all(p.grad is None for p in model.parameters())  # gradients cleared, flags restored
    assert not model.model.embed_tokens.weight.requires_grad and model.model.norm.weight.requires_grad
    model.zero_grad()
    nuc = 0.0
    for b in batches:  # direct: the mean token loss of each batch, its q_proj gradient, its nuclear norm
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1), ignore_index=-100)
        (g,) = torch.autograd.grad(loss, model.model.layers[0].self_attn.q_proj.weight)
        nuc += float(torch.linalg.svdvals(g.double()).sum()) / len(batches)
    assert rows["model.layers.0.self_attn.q_proj"]["grad_nuclear_norm"] == pytest.approx(nuc, rel=1e-4)
    R = torch.randn(7, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    Rn = R - R.mean(0)
    Rn = Rn / Rn.norm(dim=1, keepdim=True)
    approx, exact = matrix_nuclear_norm(R)
    assert exact == pytest.approx(float(torch.linalg.svdvals(Rn).sum()) / 7, rel=1e-6)  # fp32 round-off differs across CPUs
    assert approx == pytest.approx(float(Rn.norm(dim=0).sort(descending=True).values[:7].sum()) / 7, rel=1e-9)
    score = nuclear_norm_score(model, batches)
    assert score["sequences"] == 4 and 0 < score["mnn_exact"] <= score["mnn"] * 1.0001 + 1.0


def test_report_renders_in_headless_chromium(inspected, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium): cannot render report.html")
    out, _ = inspected
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--screenshot={shot}",
           "--window-size=1280,2000", (out / "report.html").resolve().as_uri()]  # fmt: skip
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "chromium wrote no screenshot"
    import matplotlib.image

    img = matplotlib.image.imread(str(shot))[..., :3]
    ink = (img.mean(axis=-1) < 0.9).mean()  # share of pixels that are not (near-)white
    assert img.shape[0] > 500 and ink > 0.02 and float(img.std()) > 0.05 and math.isfinite(float(img.std()))


def test_inspect_reads_a_peft_adapter_folder(tiny_run_inputs, tmp_path, plots_skipped):
    peft = pytest.importorskip("peft")
    model_dir, _ = tiny_run_inputs
    model, _ = svdkit.load_model(model_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(model_dir)
    lora.save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter"), "--out", str(tmp_path / "o")]) == 0
    doc = json.loads((tmp_path / "o" / "spectrum.json").read_text())
    assert [r["kind"] for r in doc["rows"]].count("peft-lora") == 2 and doc["meta"]["kind"].startswith("PEFT adapter")
