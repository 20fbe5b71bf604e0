"""Record what ``secateurs prune`` does today, run by run, so that a later version can be held
to it bit for bit (``tests/golden/test_golden.py``).

Every run goes through the command line only (in process, typer's CliRunner) and saves its
model and JSON result; its record is the pruned and dense perplexity and the measured sparsity
from ``--save_json``, and two SHA-256 digests over the saved decoder-block weight matrices
(every 2-D ``*.weight`` inside ``layers.`` / ``.h.`` / ``decoder.layers``, in sorted name
order, each digest fed ``name:shape:dtype`` and then the bytes): one of the zero masks
(``weight == 0``) and one of the raw weights. A run that the command refuses with exit code
2 records ``{"refused": <its error line>}``: refusing is behaviour too. Any other non-zero
exit is a bug; it is reported and never recorded.

Groups: ``tiny`` (every tiny architecture of ``conftest.ARCHS`` x every method of
``secateurs.scores.METHODS`` x unstructured 0.5, 2:4, 4:8, neuron; both lists frozen below),
``extras`` (tiny LLaMA: Wanda variant, recovery, OWL, --neg_prune, --offload disk, two
data-parallel processes) and ``smollm2`` (the built-in SmolLM2-135M, 20 to 45 s a run).

Float results depend on the machine (CPU instruction set and vendor, torch build), so every
run uses one torch thread (``THREADS``), the file names the machine that recorded it
(``MACHINE_KEY``), and only there is a run held to its record bit for bit. Elsewhere it is
held to a portable fingerprint of the same run (:func:`differences_elsewhere`): perplexities
and the weights' sums within a relative tolerance, the count of zeros exactly, and how many
positions changed from zero to kept or back, estimated from ``SKETCHES`` hashed +-1 sums over
the zeros, within a share of the zeros (``PORTABLE``, by group: SmolLM2's runs on 8 short
windows move by up to 5% in perplexity between an AVX-512 Xeon and an AVX2 EPYC). Positions
flipped by float rounding pass, another method, ratio or pattern does not; behaviour is held
bit for bit only on the recording kind of machine.

    python tests/golden/record.py [--only tiny|extras|smollm2] [--method NAME]

``--only`` rewrites only that group's keys of an existing file and keeps the others (keys no
longer in the matrix are dropped); ``--method NAME`` likewise only the runs of one method.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # run as a script: conftest and chat_helpers live in tests/
    sys.path.insert(0, str(TESTS))

from chat_helpers import chat_tokenizer, write_pairs  # noqa: E402
from conftest import invoke, make_model, make_tokenizer, random_text  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

# The matrix as it was recorded, frozen here so that moving secateurs' modules around cannot
# change it; main() checks that conftest.ARCHS are these and that `secateurs prune` still
# offers these methods (secateurs.scores.METHODS at 709b90a; methods added since, such as alps,
# random and wanda_v2, are held by their own tests), and the "unknown method" run records the
# command's list.
# Every qwen2 run is refused (0 tokens): transformers 5 loads a Qwen2Tokenizer for a qwen2
# folder whatever its tokenizer_config says, and that BPE rebuild of the tiny word-level
# vocabulary encodes nothing.
ARCHS = ("llama", "qwen2", "opt", "gpt2", "gemma3", "mistral", "phi3")
METHODS = (
    "magnitude",
    "wanda",
    "wanda_idf",
    "wanda_spiky",
    "wanda_select",
    "neuronrank_fisher",
    "wandg",
    "wandg_set_difference",
    "ria",
    "sparsegpt",
)

GOLDEN = Path(__file__).resolve().parent / "golden.json"
GROUPS = ("tiny", "extras", "smollm2")
PATTERNS = {
    "unstructured": ("--sparsity_type", "unstructured", "--sparsity_ratio", "0.5"),
    "2:4": ("--sparsity_type", "2:4"),
    "4:8": ("--sparsity_type", "4:8"),
    "neuron": ("--sparsity_type", "neuron", "--sparsity_ratio", "0.5"),
}
TINY = ("--seqlen", "32", "--nsamples", "8")
SMOLLM2 = (
    "--dataset",
    "wiki-sample",
    "--nsamples",
    "8",
    "--seqlen",
    "128",
    "--eval_limit",
    "8",
)
# methods that score on prompt/response pairs: what each adds to the command line
PAIRS = {
    "wandg": ("--prune_data", "{safety}"),
    "wandg_set_difference": (
        "--prune_data",
        "{safety}",
        "--utility_data",
        "{utility}",
        "--p",
        "0.1",
        "--q",
        "0.1",
    ),
}
THREADS = 1
BLOCKS = ("layers.", ".h.", "decoder.layers")


@dataclass(frozen=True)
class Run:
    """One recorded run: ``args`` may hold ``{safety}`` and ``{utility}`` placeholders."""

    key: str
    group: str
    model: str  # a tiny architecture of conftest.ARCHS, or a built-in model name
    args: tuple[str, ...]
    chat: bool = False  # the tiny model's tokenizer has a chat template (prompt data)
    processes: int = 1  # 2: a data-parallel run, two gloo processes as torchrun starts them
    integration: bool = False  # slow or multi-process: pytest -m integration


class UnexpectedExit(RuntimeError):
    """The command ended with an exit code other than 0 (done) or 2 (refused): a bug."""


def _method_args(method: str) -> tuple[str, ...]:
    return ("--prune_method", method, *PAIRS.get(method, ()))


def _tiny(arch: str, method: str, pattern: str, extra: tuple[str, ...] = (), **kw) -> Run:
    """A run on a tiny model (its key and group are given by ``runs``)."""
    return Run(
        key="",
        group="",
        model=arch,
        args=(*TINY, *_method_args(method), *PATTERNS[pattern], *extra),
        chat=method in PAIRS,
        **kw,
    )


def runs() -> list[Run]:
    """The whole matrix, in a fixed order, keys unique."""
    out: list[Run] = []

    def add(key: str, run: Run, group: str) -> None:
        out.append(replace(run, key=key, group=group))

    for arch in ARCHS:
        for method in METHODS:
            for pattern in PATTERNS:
                add(f"{arch}/{method}/{pattern}", _tiny(arch, method, pattern), "tiny")

    extras: dict[str, Run] = {
        "wanda/unstructured+variant": _tiny("llama", "wanda", "unstructured", ("--use_variant",)),
        "wanda/unstructured+owl": _tiny(
            "llama", "wanda", "unstructured", ("--sparsity_allocation", "owl")
        ),
        "sparsegpt/unstructured+owl": _tiny(
            "llama", "sparsegpt", "unstructured", ("--sparsity_allocation", "owl")
        ),
        "wanda/unstructured+offload=disk": _tiny(
            "llama", "wanda", "unstructured", ("--offload", "disk"), integration=True
        ),
        "sparsegpt/unstructured+offload=disk": _tiny(
            "llama", "sparsegpt", "unstructured", ("--offload", "disk"), integration=True
        ),
        # 8 windows in batches of 2: shares of 2 batches per process
        "wanda/unstructured+batch_size=2": _tiny(
            "llama", "wanda", "unstructured", ("--batch_size", "2")
        ),
        "wanda/unstructured+batch_size=2+torchrun2": _tiny(
            "llama", "wanda", "unstructured", ("--batch_size", "2"), processes=2, integration=True
        ),
    }
    for recovery in ("inverse_wanda", "least_squares"):
        for pattern in ("unstructured", "2:4"):
            extras[f"wanda/{pattern}+recovery={recovery}"] = _tiny(
                "llama", "wanda", pattern, ("--use_recovery", "--recovery", recovery)
            )
    for method in METHODS:  # refusals included: the solver has no score to negate
        extras[f"{method}/unstructured+neg_prune"] = _tiny(
            "llama", method, "unstructured", ("--neg_prune",)
        )
    for name, run in extras.items():
        add(f"llama/{name}", run, "extras")

    for method, pattern in (
        ("wanda", "unstructured"),
        ("sparsegpt", "2:4"),
        ("wanda_select", "unstructured"),
    ):
        run = Run(
            "",
            "smollm2",
            "smollm2-135m",
            (*SMOLLM2, "--prune_method", method, *PATTERNS[pattern]),
            integration=True,
        )
        add(f"smollm2-135m/{method}/{pattern}", run, "smollm2")

    keys = [r.key for r in out]
    assert len(keys) == len(set(keys)), "duplicate keys"
    return out


class Workspace:
    """Tiny model folders, the text folder and the prompt files, written on first use."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._count = 0

    def text(self) -> Path:
        path = self.root / "text"
        if not path.exists():
            path.mkdir()
            (path / "train.txt").write_text(random_text(4000, seed=1))
            (path / "test.txt").write_text(random_text(1200, seed=2))
        return path

    def pairs(self) -> dict[str, str]:
        safety, utility = self.root / "safety.jsonl", self.root / "utility.jsonl"
        if not safety.exists():
            write_pairs(safety, seed=0)
            write_pairs(utility, seed=50)
        return {"safety": str(safety), "utility": str(utility)}

    def model(self, arch: str, chat: bool) -> Path:
        path = self.root / f"tiny-{arch}{'-chat' if chat else ''}"
        if not path.exists():
            make_model(arch).save_pretrained(path)
            (chat_tokenizer() if chat else make_tokenizer()).save_pretrained(path)
        return path

    def scratch(self) -> Path:
        """A fresh, empty folder for one run's outputs."""
        self._count += 1
        path = self.root / f"run-{self._count}"
        path.mkdir()
        return path

    def command(self, run: Run, out: Path) -> list[str]:
        """The whole ``secateurs prune`` argument list of ``run``, writing under ``out``."""
        args = [a.format(**self.pairs()) if "{" in a else a for a in run.args]
        if run.model in ARCHS:
            model = ["--model", str(self.model(run.model, run.chat)), "--dataset", str(self.text())]
        else:
            model = ["--model", run.model]
        return [
            "prune",
            *model,
            *args,
            "--quiet",
            "--save_model",
            str(out / "model"),
            "--save_json",
            str(out / "result.json"),
        ]


def error_line(output: str, root: Path | None = None) -> str:
    """The line that says why a run was refused (warnings may come before it), with the
    workspace folder, which changes from run to run, written as ``<workspace>``."""
    if root is not None:
        output = output.replace(str(root), "<workspace>")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if line.startswith("error:"):
            return line
    return lines[0] if lines else ""


MACHINE_KEY = "_machine"
SKETCHES = 16
# tolerances on another machine: (perplexity, weights' sums, share of the zeros that moved)
# (SparseGPT on SmolLM2 moves 14% of its 2:4 positions between 1 and 2 threads: its choices
# within a group of four are near ties after the updates; Wanda and magnitude differ in more)
PORTABLE = {
    "tiny": (1e-3, 1e-3, 0.05),
    "extras": (1e-3, 1e-3, 0.05),
    "smollm2": (0.1, 2e-3, 0.3),
}


def machine() -> dict[str, str]:
    """What decides a run's float rounding: torch's kernels, its CPU dispatch, the vendor."""
    vendor = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                vendor = line.partition(":")[2].strip()
                break
    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "vendor": vendor,
    }


def _zero_sketches(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """``SKETCHES`` sums of a hashed +-1 per position over the zeros of ``tensor``: two masks
    that differ in ``d`` positions give sketches whose squared differences average ``d``."""
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)
    where = (tensor.flatten() == 0).nonzero().squeeze(1)
    sums = torch.zeros(SKETCHES, dtype=torch.float64)
    for j in range(SKETCHES):
        multiplier = (seed + 2 * j * 0x9E3779B9) | 1  # odd: a bijection of the positions
        bits = ((where * multiplier + j) >> 17) & 1
        sums[j] = float(where.numel() - 2 * int(bits.sum()))
    return sums


def _fingerprint(names: list[str], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Sums of the weights and sketches of where their zeros are (see the module)."""
    total = square = absolute = 0.0
    zeros = 0
    sketches = torch.zeros(SKETCHES, dtype=torch.float64)
    for name in names:
        tensor = tensors[name].double()
        total += float(tensor.sum())
        square += float(tensor.square().sum())
        absolute += float(tensor.abs().sum())
        zeros += int((tensor == 0).sum())
        sketches += _zero_sketches(name, tensor)
    return {
        "sum": total,
        "sumsq": square,
        "abs": absolute,
        "zeros": zeros,
        "sketches": sketches.tolist(),
    }


def differences_elsewhere(got: dict[str, Any], want: dict[str, Any], group: str) -> list[str]:
    """How a run on another machine departs from its record beyond float rounding."""
    if "refused" in want or "refused" in got:
        return [] if got == want else [f"refused: {got.get('refused')} != {want.get('refused')}"]
    ppl_rtol, rtol, share = PORTABLE[group]
    problems = [
        f"{key}: {got[key]} != {want[key]}"
        for key in ("sparsity", "tensors")
        if got[key] != want[key]
    ]
    for key in ("ppl", "dense_ppl"):
        if not math.isclose(got[key], want[key], rel_tol=ppl_rtol):
            problems.append(f"{key}: {got[key]} != {want[key]}")
    mine, theirs = got["fingerprint"], want["fingerprint"]
    if mine["zeros"] != theirs["zeros"]:
        problems.append(f"zeros: {mine['zeros']} != {theirs['zeros']}")
    differ = sum((a - b) ** 2 for a, b in zip(mine["sketches"], theirs["sketches"], strict=True))
    differ /= SKETCHES  # about how many positions are zero in one and not the other
    if differ > share * max(theirs["zeros"], 1):
        problems.append(f"about {differ:.0f} of {theirs['zeros']} zeros moved")
    for key in ("sum", "sumsq", "abs"):
        # a plain sum can cancel to near zero: its tolerance is a share of the absolute mass
        bound = rtol * (theirs["abs"] if key == "sum" else theirs[key])
        if abs(mine[key] - theirs[key]) > bound:
            problems.append(f"weights' {key}: {mine[key]} != {theirs[key]}")
    return problems


def weight_digests(folder: Path) -> dict[str, Any]:
    """SHA-256 of the zero masks and of the raw bytes of the saved decoder-block matrices,
    and their portable fingerprint."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    names = sorted(
        name
        for name, tensor in tensors.items()
        if tensor.dim() == 2 and name.endswith(".weight") and any(b in name for b in BLOCKS)
    )
    masks, weights = hashlib.sha256(), hashlib.sha256()
    for name in names:
        tensor = tensors[name].contiguous()
        header = f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode()
        masks.update(header)
        masks.update((tensor == 0).numpy().tobytes())
        weights.update(header)
        weights.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return {
        "masks": masks.hexdigest(),
        "weights": weights.hexdigest(),
        "tensors": len(names),
        "fingerprint": _fingerprint(names, tensors),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank(rank: int, size: int, port: int, command: list[str], folder: str) -> None:
    """One process of a data-parallel launch, with the environment torchrun would give it."""
    os.environ |= {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(size),
        "LOCAL_WORLD_SIZE": str(size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    torch.set_num_threads(THREADS)
    result = invoke(*command)
    Path(folder, f"rank-{rank}.json").write_text(
        json.dumps({"exit_code": result.exit_code, "output": result.output})
    )


def _invoke(run: Run, command: list[str], out: Path) -> tuple[int, str]:
    """Exit code and output of the command, in this process or in ``run.processes``."""
    if run.processes == 1:
        result = invoke(*command)
        if result.exit_code not in (0, 2) and result.exception is not None:
            detail = f"{type(result.exception).__name__}: {result.exception}"
            return result.exit_code, f"{result.output}\n{detail}"
        return result.exit_code, result.output
    import torch.multiprocessing as mp

    mp.start_processes(
        _rank,
        args=(run.processes, _free_port(), command, str(out)),
        nprocs=run.processes,
        start_method="spawn",
    )
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(run.processes)]
    codes = {r["exit_code"] for r in ranks}
    output = "\n".join(f"[rank {i}] {r['output']}" for i, r in enumerate(ranks))
    return (ranks[0]["exit_code"] if len(codes) == 1 else -1), output


def record_run(run: Run, workspace: Workspace) -> dict[str, Any]:
    """The record of one run, or UnexpectedExit for an exit code other than 0 and 2."""
    out = workspace.scratch()
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        code, output = _invoke(run, workspace.command(run, out), out)
        if code == 2:
            return {"refused": error_line(output, workspace.root)}
        if code != 0:
            raise UnexpectedExit(f"{run.key}: exit code {code}\n{output}")
        result = json.loads((out / "result.json").read_text())
        return {
            "ppl": result["perplexity"]["pruned"],
            "dense_ppl": result["perplexity"]["dense"],
            "sparsity": result["sparsity"]["overall"],
            **weight_digests(out / "model"),
        }
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(out, ignore_errors=True)  # a SmolLM2 folder takes 540 MB


def record_all(
    selected: list[Run], root: Path, log=print
) -> Iterator[tuple[Run, dict[str, Any] | None, str | None]]:
    """``(run, record, None)`` per run, or ``(run, None, why)`` where the exit was a bug."""
    workspace = Workspace(root)
    for run in selected:
        start = time.perf_counter()
        try:
            record, problem = record_run(run, workspace), None
        except UnexpectedExit as exc:
            record, problem = None, str(exc)
        what = "BUG" if problem else ("refused" if "refused" in record else "ok")
        log(f"{time.perf_counter() - start:6.1f} s  {what:<8} {run.key}")
        yield run, record, problem


def load_golden(path: Path = GOLDEN) -> dict[str, Any]:
    """The records by run key (the recording machine, ``MACHINE_KEY``, left out)."""
    golden = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    golden.pop(MACHINE_KEY, None)
    return golden


def recorded_machine(path: Path = GOLDEN) -> dict[str, str] | None:
    """The machine that recorded ``path``."""
    return json.loads(Path(path).read_text()).get(MACHINE_KEY) if Path(path).exists() else None


def offered_methods() -> tuple[str, ...]:
    """The methods the command offers, read from its refusal of an unknown one."""
    line = error_line(invoke("prune", "--prune_method", "no_such_method").output)
    return tuple(m.strip() for m in line.partition("choose one of:")[2].split(","))


def check_frozen_lists() -> None:
    """The frozen matrix must still be what the code at hand offers when recording."""
    import conftest

    if tuple(conftest.ARCHS) != ARCHS or not set(METHODS) <= set(offered_methods()):
        raise SystemExit(
            f"record.ARCHS/METHODS {ARCHS}, {METHODS} are not conftest.ARCHS and among the "
            f"methods of secateurs prune {tuple(conftest.ARCHS)}, {offered_methods()}"
        )


def method_of(run: Run) -> str:
    """The ``--prune_method`` a run names."""
    return run.args[run.args.index("--prune_method") + 1]


def main(argv: list[str] | None = None) -> int:
    check_frozen_lists()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN)
    parser.add_argument("--only", choices=GROUPS, help="record (and replace) one group only")
    parser.add_argument(
        "--method", help="record (and replace) only the runs of this --prune_method"
    )
    options = parser.parse_args(argv)
    selected = [
        r
        for r in runs()
        if options.only in (None, r.group) and options.method in (None, method_of(r))
    ]
    partial = bool(options.only or options.method)
    golden = load_golden(options.out) if partial else {}
    recorder = recorded_machine(options.out) if partial else None
    if recorder not in (None, machine()):
        raise SystemExit(
            f"{options.out} was recorded on {recorder}, this is {machine()}: record every "
            "group here (no --only or --method)"
        )
    known = {r.key for r in runs()} - {r.key for r in selected}
    golden = {k: v for k, v in golden.items() if k in known}  # drops keys no longer in runs()
    problems = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="golden-") as root:
        for run, record, problem in record_all(selected, Path(root)):
            if problem is None:
                golden[run.key] = record
            else:
                problems.append(problem)
    golden[MACHINE_KEY] = machine()
    options.out.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    refused = sum("refused" in golden[r.key] for r in selected if r.key in golden)
    print(
        f"{len(selected)} runs in {time.perf_counter() - start:.0f} s: "
        f"{len(selected) - len(problems)} recorded ({refused} refused), "
        f"{len(problems)} unexpected exits; wrote {options.out}"
    )
    for problem in problems:
        print(f"\nUNEXPECTED EXIT {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
