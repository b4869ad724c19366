"""Shared fixtures: an isolated environment for each test, the repo's paths, and the removal of the
shared memory that DeepSpeed's CPU processes leave behind."""

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Variables of ours that a developer's shell may have set; tests must not inherit them.
_OURS = None


def _our_variable_names():
    global _OURS
    if _OURS is None:
        import config

        _OURS = config.VARIABLE_NAMES
    return _OURS


def mapped_shared_memory() -> set[str]:
    """The /dev/shm files that some live process has mapped."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            mapped.update(
                line.split(None, 5)[5].strip() for line in maps.read_text().splitlines() if "/dev/shm/" in line
            )
        except (OSError, IndexError):
            continue  # the process ended meanwhile, or the line maps no file
    return mapped


@pytest.fixture(autouse=True)
def remove_deepspeed_shared_memory():
    """DeepSpeed's CPU all-reduce leaves a ~67 MB /dev/shm file per process and master port, and the
    tests launch many processes on free ports: left alone they fill a machine's memory over a few suite
    runs (21 GB here). After each test the buffers that no live process maps go: those of this test's
    ended processes, never those of a test running beside it (pytest -n)."""
    yield
    remove_unmapped_deepspeed_buffers()


def remove_unmapped_deepspeed_buffers() -> None:
    """A process creates its buffer (tens of MB written) before it maps it, and its peers wait for the
    name: a buffer is removed only when no process maps it and it is older than any creation takes,
    so that a run starting beside (another test suite, pytest -n) never loses one."""
    settled = []
    for leftover in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        try:
            if time.time() - leftover.stat().st_mtime > 30:
                settled.append(leftover)
        except FileNotFoundError:
            continue
    if not settled:
        return  # reading every process's memory map takes ~40 ms: only when there is a candidate
    in_use = mapped_shared_memory()
    for leftover in settled:
        if str(leftover) not in in_use:
            leftover.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def shared_cache_folder(tmp_path_factory):
    """One CACHE_DIR for the whole run: validate_setup records there that the stack checks passed, so
    later tests' trainer.sh runs skip them, as a user's restarts do."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def base_env(tmp_path, shared_cache_folder):
    """A clean process environment for a pipeline run in tmp_path: our variables removed, offline Hub,
    one CPU thread per process so that two-process tests do not oversubscribe the two CI cores."""
    env = {k: v for k, v in os.environ.items() if k not in _our_variable_names()}
    env.update(
        OUTPUT_DIR=str(tmp_path / "output"),
        WORK_DIR=str(tmp_path / "work"),
        CACHE_DIR=str(shared_cache_folder),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def root():
    return ROOT
