"""Helpers shared by the benchmark scripts (run them as `.venv/bin/python benchmarks/NAME.py`)."""

from __future__ import annotations

import os
import sys
import time

import torch

from svdkit.benchmarking.diagnose import malloc_trim, reset_peak as reset_hwm, status_kib as proc_status_kib  # noqa: F401 (re-exported)
from svdkit.core.files import write_text


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def provenance(details: str) -> list[str]:
    """Report header lines: library versions, threads, CPU, time, this run's ``details``, and the command."""
    import datetime
    import importlib.metadata
    import shlex

    import svdkit

    try:
        peft = f"peft {importlib.metadata.version('peft')}, "
    except importlib.metadata.PackageNotFoundError:
        peft = ""
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    command = shlex.join([os.path.relpath(sys.executable), *sys.argv])
    return [f"torch {torch.__version__}, {peft}svdkit {svdkit.__version__}, threads {torch.get_num_threads()}, "
            f"CPU {cpu_model()} ({os.cpu_count()} cores), {now}, {details}  ", f"command: `{command}`"]  # fmt: skip


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def write_report(path: str, text: str) -> None:
    """Write a results table atomically, creating its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_text(path, text)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


PARAGRAPH = (
    "The river rises in the hills to the north of the town and runs for about forty miles before it "
    "reaches the sea. For most of the year it is slow and shallow, and children wade across it in summer "
    "to reach the orchards on the far bank. In the spring, however, when the snow melts in the mountains, "
    "the water climbs quickly, and the old stone bridge near the mill has more than once been closed for "
    "a week at a time. The town council has argued for decades about whether to build a new bridge "
    "further downstream, where the valley is wider and the banks are firmer, but every plan so far has "
    "been set aside because of its cost. Meanwhile the farmers who live on the eastern side have learned "
    "to keep a second store of grain and fuel, and the school closes for a few days each April so that "
    "no one has to cross the river when it is high."
)


# -- the batch ---------------------------------------------------------------------------------------
def make_batch(tok, batch: int, seq: int) -> torch.Tensor:
    """(batch, seq) token ids: the paragraph tokenized once, repeated, row i starting at offset 17·i."""
    ids = tok(PARAGRAPH, add_special_tokens=False)["input_ids"]
    need = batch * 17 + seq
    stream = (ids * (need // len(ids) + 1))[:need]
    return torch.tensor([stream[17 * i: 17 * i + seq] for i in range(batch)], dtype=torch.long)


class LoadMeter:
    """CPU time that OTHER processes used while timing: (Δ busy jiffies machine-wide − Δ own) / Δ wall."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return sum(vals[:8]) - vals[3] - vals[4]  # user..steal minus idle and iowait

    @staticmethod
    def _own() -> int:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime of all threads

    def cores(self) -> float:
        """Average number of cores kept busy by other processes since construction."""
        wall = time.perf_counter() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(other, 0) / self.tick / wall if wall > 0 else 0.0


def resident_model(tok_batch: int, seq: int):
    """(model, batch ids, VmRSS KiB, malloc_trim ok) for a memory subprocess: the default model loaded with
    every weight page touched (the weights are mmapped and paged in lazily, so no variant is charged for
    first-touching them) and glibc's heap trimmed, so the RSS is the baseline the variant adds to."""
    import gc

    import svdkit

    model, tok = svdkit.load_model("default")
    ids = make_batch(tok, tok_batch, seq)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.sum()
    gc.collect()
    trimmed = malloc_trim()
    return model, ids, proc_status_kib("VmRSS"), trimmed

