"""``python -m pipeline push RUN_DIR --repo-id USER/NAME``: upload a finished run's exported
student (``RUN_DIR/final/student``) to the Hugging Face Hub, with its model card rewritten for
the repo (``model_card.py``), through ``huggingface_hub`` in one commit.

Nothing local is changed: the card for the repo is built in memory (from what the run recorded
when it finished, so it says the same from any directory), the other files are read as they are.
Without the network (``HF_HUB_OFFLINE=1``) or a token (``HF_TOKEN``, or ``hf auth login``) it is
a one-line error naming what is missing, before anything is sent. ``--dry-run`` prints the card
and the file list and sends nothing (no network or token needed).
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError

from .model_card import model_card_text

CARD = "README.md"


def hub_problems() -> list[str]:
    """What stands between this machine and an upload, as phrases (empty: nothing known)."""
    from huggingface_hub import constants, get_token

    problems = []
    if constants.is_offline_mode():
        problems.append("the hub is out of reach (HF_HUB_OFFLINE=1 is set; unset it on a machine with the network)")
    if not get_token():
        problems.append("no Hugging Face token is set (set HF_TOKEN or run `hf auth login`)")
    return problems


def check_repo_id(repo_id: str) -> None:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--repo-id {repo_id!r} is not a hub repo id; give USER/NAME")


def check_hub(repo_id: str) -> None:
    check_repo_id(repo_id)
    problems = hub_problems()
    if problems:
        raise PipelineError(f"cannot push to {repo_id}: {' and '.join(problems)}; nothing was uploaded or changed")


def upload_files(run_dir: Path, repo_id: str | None) -> dict[str, Path | bytes]:
    """path in the repo -> local file (or, for the card, its bytes): every file of the exported
    student, and the model card rewritten for ``repo_id`` (from the run's summary.json; the
    exported card as it is for a run written before summary.json kept it)."""
    student = Path(run_dir) / "final" / "student"
    if not (student / "config.json").is_file():
        raise PipelineError(f"{student} holds no exported student; finish the run first (train-student or resume)")
    files: dict[str, Path | bytes] = {p.relative_to(student).as_posix(): p for p in sorted(student.rglob("*"))
                                      if p.is_file() and not p.name.startswith(".")}
    try:
        info = json.loads((Path(run_dir) / "summary.json").read_text()).get("model_card")
    except (OSError, ValueError):
        info = None
    if info:
        files[CARD] = model_card_text(info, student.name, repo_id).encode("utf-8")
    return files


def push(run_dir: Path, repo_id: str, private: bool = False) -> str:
    """Upload ``run_dir``'s student to ``repo_id`` (created if needed); returns the commit URL."""
    check_hub(repo_id)
    files = upload_files(run_dir, repo_id)
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.create_commit(repo_id, [CommitOperationAdd(path, source if isinstance(source, bytes)
                                                                else str(source)) for path, source in files.items()],
                                   commit_message=f"Upload distilled student from kd-pipeline run {Path(run_dir).name}")
    except Exception as e:  # network, auth and hub errors come in many types
        raise PipelineError(f"upload to {repo_id} failed ({e.__class__.__name__}: {str(e).splitlines()[0][:160]}); "
                            "check the network, the token's write access and the repo id; nothing local was "
                            "changed") from None
    print(f"pushed {len(files)} files to https://huggingface.co/{repo_id}")
    return str(getattr(commit, "commit_url", repo_id))


def dry_run(run_dir: Path, repo_id: str | None) -> str:
    """What ``push`` would upload, as text: the card, then each file with its size. Sends nothing."""
    if repo_id:
        check_repo_id(repo_id)
    files = upload_files(run_dir, repo_id)
    card = files.get(CARD)
    card_text = card.decode("utf-8") if isinstance(card, bytes) else card.read_text(encoding="utf-8") if card else ""
    sizes = {path: len(src) if isinstance(src, bytes) else src.stat().st_size for path, src in files.items()}
    rows = [f"{n:>12,d}  {path}" for path, n in sizes.items()]
    target = repo_id or "(no --repo-id: the card names the folder)"
    return "\n".join([card_text.rstrip(), "", f"--- dry run: {len(files)} files ({sum(sizes.values()):,d} bytes) "
                      f"would go to {target}; nothing was uploaded ---", *rows])


def main(args) -> int:
    if args.dry_run:
        print(dry_run(Path(args.run_dir), args.repo_id))
        return 0
    if not args.repo_id:
        raise ConfigError("push needs --repo-id USER/NAME (or --dry-run to see the card and the files first)")
    push(Path(args.run_dir), args.repo_id, private=args.private)
    return 0
