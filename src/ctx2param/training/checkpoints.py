"""Training checkpoints: which one a resumed run starts from, and the output folder a new run may use.

A run's folder holds ``checkpoint-<step>`` folders written by ``transformers.Trainer``. A kill can leave the
newest one half-written (the Trainer writes its files one after the other), so resuming takes the newest
*complete* one (:func:`latest_complete_checkpoint`). A checkpoint is complete when every file resuming reads
is there and readable, checked from headers and structure only (cheap, nothing is loaded):

- ``config.json``: a JSON object (the generator's config);
- the method's weights: ``model.safetensors``, or every shard its ``model.safetensors.index.json`` lists
  (names inside the folder), each with a valid safetensors header that covers the whole file;
- ``trainer_state.json``: a JSON object whose ``global_step`` equals the folder's step (the Trainer writes
  it last, so a checkpoint cut short lacks it or has a truncated one);
- unless the run saves the model only (``require_optimizer=False``): ``optimizer.pt``, ``scheduler.pt`` and
  ``rng_state.pth`` (or one ``rng_state_<rank>.pth`` per process), each a complete torch archive (a zip
  whose central directory, written last, is intact); ``scaler.pt`` and ``training_args.bin`` when present;
- ``card_data.json``, when present: a JSON object.

:func:`prepare_output_dir` guards the start of a run: a folder that holds something is refused unless the
run resumes (``--resume``) or the user asks for it to be cleared (``--overwrite``), so that two runs never mix
in one folder and stale checkpoints of an earlier run are never resumed from or published.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from ..modeling_utils import CheckpointError, weight_file_names

__all__ = ["checkpoint_problems", "latest_complete_checkpoint", "prepare_output_dir"]

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")  # as transformers.trainer_utils names them
TRAINER_STATE_NAME = "trainer_state.json"
OPTIMIZER_FILES = ("optimizer.pt", "scheduler.pt")
OPTIONAL_TORCH_FILES = ("scaler.pt", "training_args.bin")


def _json_object(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        return None, f"{path.name} is unreadable ({type(err).__name__})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def _torch_archive_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return f"{path.name} is empty"
    except (OSError, zipfile.BadZipFile, ValueError):
        return f"{path.name} is truncated or not a torch file"
    return None


def checkpoint_problems(folder: str | os.PathLike, require_optimizer: bool = True) -> list[str]:
    """What keeps ``folder`` (a ``checkpoint-<step>`` folder) from being resumed; ``[]`` when complete.

    See the module docstring for what is checked. ``require_optimizer=False`` for runs with
    ``save_only_model=True``, whose checkpoints hold no optimizer, scheduler or RNG state.
    """
    from safetensors import SafetensorError, safe_open

    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder} is not a folder"]
    problems = []
    _, problem = _json_object(folder / "config.json")
    if problem:
        problems.append(problem)
    try:
        for name in weight_file_names(folder):
            path = folder / name
            if not path.is_file():
                problems.append(f"{name} is missing")
                continue
            try:
                with safe_open(str(path), framework="pt"):
                    pass
            except (SafetensorError, OSError, ValueError) as err:
                problems.append(f"{name} is unreadable ({err})")
    except CheckpointError as err:
        problems.append(str(err))
    state, problem = _json_object(folder / TRAINER_STATE_NAME)
    if problem:
        problems.append(problem)
    else:
        match = CHECKPOINT_PATTERN.match(folder.name)
        if match and state.get("global_step") != int(match.group(1)):
            problems.append(
                f"{TRAINER_STATE_NAME} is at step {state.get('global_step')!r}, not {int(match.group(1))}"
            )
    if require_optimizer:
        for name in OPTIMIZER_FILES:
            if problem := _torch_archive_problem(folder / name):
                problems.append(problem)
        rng = sorted(folder.glob("rng_state*.pth"))
        if not rng:
            problems.append("rng_state.pth is missing")
        problems += [p for path in rng if (p := _torch_archive_problem(path))]
    for name in OPTIONAL_TORCH_FILES:
        if (folder / name).exists() and (problem := _torch_archive_problem(folder / name)):
            problems.append(problem)
    if (folder / "card_data.json").exists():
        _, problem = _json_object(folder / "card_data.json")
        if problem:
            problems.append(problem)
    return problems


def latest_complete_checkpoint(output_dir: str | os.PathLike, require_optimizer: bool = True) -> Path | None:
    """The ``checkpoint-<step>`` folder of ``output_dir`` with the highest step that is complete (see
    :func:`checkpoint_problems`), or ``None`` when there is none. Every newer one that is not complete is
    skipped with a warning that names it and says what is wrong with it."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    candidates = []
    for entry in output_dir.iterdir():
        match = CHECKPOINT_PATTERN.match(entry.name)
        if match and entry.is_dir():
            candidates.append((int(match.group(1)), entry))
    for _, folder in sorted(candidates, reverse=True):
        problems = checkpoint_problems(folder, require_optimizer=require_optimizer)
        if not problems:
            return folder
        logger.warning(
            "Skipping the incomplete checkpoint %s (%s): it was probably cut short by a crash or a kill; "
            "resuming from an older one.",
            folder,
            "; ".join(problems[:4]),
        )
    return None


def prepare_output_dir(out: str | os.PathLike, resume: bool, overwrite: bool) -> Path:
    """Check (and create, or clear) the output folder of a training run before anything is loaded.

    - ``resume``: ``out`` must hold a complete checkpoint to continue from.
    - otherwise ``out`` must be missing or empty, or ``overwrite`` must be given: then everything in it is
      deleted (the folder is first renamed aside, so it is never left half-cleared).

    Returns:
        ``out`` as a path (created when missing).

    Raises:
        ValueError: ``resume`` and ``overwrite`` together, or nothing to resume from.
        FileExistsError: ``out`` is a file, or a non-empty folder without ``resume`` or ``overwrite``.
    """
    out = Path(out)
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in --out and --overwrite deletes it; give one of them, not both."
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is a file; pass a folder.")
    if resume:
        if latest_complete_checkpoint(out) is None:
            raise ValueError(
                f"--resume: {out} holds no complete checkpoint-<step> folder to continue from; drop --resume "
                "to start a new run (into an empty folder)."
            )
        return out
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise FileExistsError(
            f"--out {out} is not empty ({len(entries)} entries: {shown}). Pass --resume to continue the run "
            "in it, --overwrite to delete its contents and start afresh, or choose another --out."
        )
    if entries:
        real, cwd = out.resolve(), Path.cwd().resolve()
        if real == cwd or real in cwd.parents or real == Path(real.anchor) or real == Path.home().resolve():
            raise ValueError(f"--overwrite: refusing to clear {out}, which holds the current folder or is /.")
        aside = Path(tempfile.mkdtemp(prefix=f".{real.name}.tmp-{os.getpid()}-", dir=real.parent))
        os.rename(real, aside / "cleared")  # one step: the folder is the old run or gone, never half-cleared
        shutil.rmtree(aside)
        logger.warning("--overwrite: deleted the %d entries of %s.", len(entries), out)
    out.mkdir(parents=True, exist_ok=True)
    return out
