"""Test-only fault injection for tests/test_faults.py, loaded by every Python process of a pipeline run
whose PYTHONPATH starts with this folder. With FAULT_PAUSE="SCRIPT|EVENT|TEXT" set, the process running
SCRIPT (`prep.py`, `train.py`, `util.py publish`, ...) freezes at its first EVENT on a path containing
TEXT, after writing FAULT_DIR/paused; the test then kills the whole process group, so the files on disk
are exactly what a kill at that moment leaves. EVENT is `write` (a file opened for writing), `read`
(opened for reading) or `replaced` (just after os.replace put a file in place)."""

import builtins
import io
import os
import sys
import time

_SPEC = os.environ.get("FAULT_PAUSE", "")


def _command() -> str:
    return " ".join([os.path.basename(sys.argv[0]) if sys.argv else "", *sys.argv[1:2]])


def _pause_if(event: str, path) -> None:
    script, wanted, text = _SPEC.split("|")
    path = os.fsdecode(path)  # some libraries (TensorBoard's writer) open files by bytes paths
    if event == wanted and text in path and _command().startswith(script):
        with builtins.open(os.path.join(os.environ["FAULT_DIR"], "paused"), "w") as marker:
            marker.write(f"{_command()} {event} {path}\n")
        while True:
            time.sleep(1)


def _install() -> None:
    original_open, original_replace = builtins.open, os.replace

    def open_with_pause(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            _pause_if("read" if set(mode) <= {"r", "b", "t"} else "write", file)
        return original_open(file, mode, *args, **kwargs)

    def replace_with_pause(src, dst, *args, **kwargs):
        original_replace(src, dst, *args, **kwargs)
        _pause_if("replaced", dst)

    builtins.open = io.open = open_with_pause
    os.replace = replace_with_pause


if _SPEC:
    _install()
