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

Float results depend on the machine (CPU instruction set, torch build), so every run uses
one torch thread (``THREADS``), and a golden file is only comparable on the kind of machine
that recorded it.

    python tests/golden/record.py --out tests/golden/golden.json [--only tiny|extras|smollm2]

``--only`` rewrites only that group's keys of an existing file and keeps the others (keys no
longer in the matrix are dropped).
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
# change it; main() checks them against conftest.ARCHS and the methods that `secateurs prune`
# offers (secateurs.scores.METHODS at 709b90a), and the "unknown method" run records those.
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


def weight_digests(folder: Path) -> dict[str, Any]:
    """SHA-256 of the zero masks and of the raw bytes of the saved decoder-block matrices."""
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
    return {"masks": masks.hexdigest(), "weights": weights.hexdigest(), "tensors": len(names)}


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
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def offered_methods() -> tuple[str, ...]:
    """The methods the command offers, read from its refusal of an unknown one."""
    line = error_line(invoke("prune", "--prune_method", "no_such_method").output)
    return tuple(m.strip() for m in line.partition("choose one of:")[2].split(","))


def check_frozen_lists() -> None:
    """The frozen matrix must still be what the code at hand offers when recording."""
    import conftest

    if tuple(conftest.ARCHS) != ARCHS or offered_methods() != METHODS:
        raise SystemExit(
            f"record.ARCHS/METHODS {ARCHS}, {METHODS} differ from conftest.ARCHS and the "
            f"methods of secateurs prune {tuple(conftest.ARCHS)}, {offered_methods()}"
        )


def main(argv: list[str] | None = None) -> int:
    check_frozen_lists()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GOLDEN)
    parser.add_argument("--only", choices=GROUPS, help="record (and replace) one group only")
    options = parser.parse_args(argv)
    selected = [r for r in runs() if options.only in (None, r.group)]
    golden = load_golden(options.out) if options.only else {}
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
