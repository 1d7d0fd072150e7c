"""Split SVD initialization across ranks (gloo, 2 CPU processes) equals the single-process init."""

from __future__ import annotations

import os
import sys

import torch
import torch.multiprocessing as mp

import svdkit
from svdkit.adapters.api import adapted_layers

from conftest import free_port, tiny_model

CFG = dict(rank=3, svd="randomized", niter=2)




def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(**CFG), progress=False)
    torch.save({n: (l.lora_A.detach(), l.lora_B.detach()) for n, l in adapted_layers(model)}, f"{out}/rank{rank}.pt")
    _leave()


def _leave() -> None:
    """Tear down the group and exit at once: gloo's threads have aborted ("terminate called without an
    active exception") in interpreter shutdown after a clean run, which would fail the test spuriously."""
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_split_init_equals_single_process_init(tmp_path):
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    single = svdkit.adapt(tiny_model("llama"), svdkit.PiSSA(**CFG), progress=False)
    expected = {n: (l.lora_A.detach(), l.lora_B.detach()) for n, l in adapted_layers(single)}
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got.keys() == expected.keys()
        for name, (A, B) in expected.items():
            assert torch.equal(got[name][0], A) and torch.equal(got[name][1], B), (rank, name)


# -- data-parallel training ------------------------------------------------------------------------
# 36 training examples in batches of 5: each epoch ends with a 1-example batch, so rank 1 gets an empty
# share at step 8 and must still join the gradient all-reduce.
TRAIN = dict(method="pissa", rank=2, steps=9, batch_size=5, lr=1e-2, eval_every=100, checkpoint_every=100,
             samples=1, max_heldout=4, method_options={"svd": "randomized", "niter": 2})  # fmt: skip


def _train_worker(rank: int, world: int, port: int, cfg: dict, out: str) -> None:
    from svdkit.training.finetune import FinetuneConfig, finetune

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)
    finetune(FinetuneConfig(**cfg), out, progress=False, log=lambda *_: None)
    _leave()


def test_two_process_training_equals_single_process_training(tiny_run_inputs, tmp_path):
    from safetensors.torch import load_file

    from svdkit.training.finetune import FinetuneConfig, finetune

    model, data = tiny_run_inputs
    cfg = dict(TRAIN, model=str(model), data=str(data))
    mp.start_processes(_train_worker, args=(2, free_port(), cfg, str(tmp_path / "ddp")), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    finetune(FinetuneConfig(**cfg), tmp_path / "single", progress=False, log=lambda *_: None)
    got = load_file(tmp_path / "ddp" / "adapter" / "adapter.safetensors")
    expected = load_file(tmp_path / "single" / "adapter" / "adapter.safetensors")
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        torch.testing.assert_close(got[key], tensor, atol=2e-5, rtol=1e-4, msg=key)
    init = svdkit.adapt(svdkit.load_model(cfg["model"])[0], FinetuneConfig(**cfg).adapter_config(), progress=False)
    moved = max(float((expected[f"{n}.lora_A"] - l.lora_A.detach()).abs().max()) for n, l in adapted_layers(init))
    assert moved > 1e-3  # the comparison above is between trained adapters, not two copies of the init


# -- calibration under data parallelism --------------------------------------------------------------
from dataclasses import dataclass  # noqa: E402

from svdkit.core.calibration import Statistic  # noqa: E402
from svdkit.core.statistics import InputCovariance  # noqa: E402

from conftest import calibration_batches  # noqa: E402


@dataclass(frozen=True)
class GatheredRows(Statistic):
    """Sees every rank's rows at each update (reduce="gather"): counts updates and rows, sums the rows."""

    kind = "gathered-rows"
    reduce = "gather"

    def start(self, n_in, m_out, device):
        return {"updates": torch.zeros(()), "rows": torch.zeros(()), "sum": torch.zeros(n_in, dtype=torch.float64)}

    def update(self, state, x, counts):
        state["updates"] += 1
        state["rows"] += x.shape[0]
        state["sum"] += x.double().sum(0)
        assert int(counts.sum()) == x.shape[0]

    def finish(self, state):
        return dict(state)


@dataclass(frozen=True)
class StatLoRA(svdkit.LoRA):
    gathered: bool = False
    uses_calibration = True

    def statistic(self):
        return GatheredRows() if self.gathered else InputCovariance(scale="max")


def _calibration_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    mine = calibration_batches(4)[rank::world]
    for gathered in (False, True):
        stats = svdkit.calibrate(tiny_model("llama"), mine, StatLoRA(gathered=gathered), progress=False)
        stats.save(f"{out}/rank{rank}-{gathered}.safetensors")
    _leave()


def test_calibration_statistics_are_reduced_over_ranks(tmp_path):
    from svdkit.core.calibration import Calibration

    mp.start_processes(_calibration_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")  # fmt: skip
    for gathered in (False, True):
        single = svdkit.calibrate(tiny_model("llama"), calibration_batches(4), StatLoRA(gathered=gathered), progress=False)
        for rank in (0, 1):
            got = Calibration.load(tmp_path / f"rank{rank}-{gathered}.safetensors")
            assert (got.samples, got.tokens, got.batches) == (single.samples, single.tokens, single.batches)
            for name in single.names:
                for key, value in single[name].items():
                    if key == "updates":  # two gathered updates of both ranks' rows instead of four
                        assert int(value) == 4 and int(got[name][key]) == 2
                    else:
                        torch.testing.assert_close(got[name][key], value, rtol=1e-6, atol=1e-9)
