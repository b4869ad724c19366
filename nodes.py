"""Several machines (NNODES > 1, each running trainer.sh with its NODE_RANK): what the nodes tell each
other through files in the shared WORK_DIR/nodes.

Node 0 prepares, publishes and advances the run state; every other node waits for it. The files:
  share.json       node 0's token for this run, rewritten every second while it waits for the others
  ack-<rank>.json  another node's answer naming that token: it sees what node 0 writes (WORK_DIR shared)
  advanced.json    node 0 published and advanced the run's n-th stage (n, `util.py advance`'s exit status)
  failed.json      a node's trainer.sh failed (node, stage, status): the waiting nodes stop at once

Waits are bounded: the storage check by SHARE_TIMEOUT_SECONDS, the waits for node 0's preparation
and publishing by the job's time limit (STARTUP_DURATION_TIMEOUT, from TRAINER_STARTED_AT).

`python3 nodes.py wait-prep | wait-advanced <n> | advanced <n> <status> | failed <stage> <status>`
for trainer.sh;
preflight.py calls check_shared_storage.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

import config
import util

SHARE_TIMEOUT_SECONDS = 300
POLL_SECONDS = 1.0


class NodeWaitError(RuntimeError):
    """A wait for another node ended without what it waited for; the message says why and what to do."""


def nodes_dir(settings: config.Settings) -> Path:
    return settings.work_dir / "nodes"


def run_token(settings: config.Settings) -> str | None:
    """This run's token: the one node 0 wrote (node 0) or this node acknowledged (the others)."""
    name = "share.json" if settings.node_rank == 0 else f"ack-{settings.node_rank}.json"
    data = util.read_json(nodes_dir(settings) / name)
    return data.get("token") if isinstance(data, dict) else None


def raise_if_a_node_failed(settings: config.Settings, token: str | None) -> None:
    failure = util.read_json(nodes_dir(settings) / "failed.json")
    if isinstance(failure, dict) and token is not None and failure.get("token") == token:
        raise NodeWaitError(
            f"node {failure.get('node')} failed in its stage '{failure.get('stage')}' (exit "
            f"{failure.get('status')}); this node stops too: see that node's log"
        )


def master_address_problem(settings: config.Settings) -> str | None:
    """None when MASTER_ADDR names an address this node can resolve (node 0 listens there only once
    training starts, so reaching it cannot be checked before), else the problem in one line."""
    import socket

    try:
        socket.getaddrinfo(settings.master_addr, None)
    except (OSError, UnicodeError) as err:
        return (
            f"MASTER_ADDR={settings.master_addr}: cannot be resolved from this node ({err}); set it to "
            "node 0's IP address or a host name every node resolves"
        )
    return None


def check_shared_storage(settings: config.Settings) -> str | None:
    """None when every node sees the same WORK_DIR, else the problem in one line. Node 0 writes a new
    token and rewrites it every second until each other node has answered with it; another node
    answers the first token it sees rewritten, so a file left by an earlier run is never taken."""
    folder, timeout = nodes_dir(settings), SHARE_TIMEOUT_SECONDS
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + timeout
    if settings.node_rank == 0:
        token, others = uuid.uuid4().hex, range(1, settings.nnodes)
        while time.time() < deadline:
            util.write_json_atomic(folder / "share.json", {"token": token, "written_at": time.time()})
            answers = [util.read_json(folder / f"ack-{rank}.json") or {} for rank in others]
            missing = [rank for rank, answer in zip(others, answers) if answer.get("token") != token]
            if not missing:
                return None
            time.sleep(POLL_SECONDS)
        return (
            f"WORK_DIR={settings.work_dir}: node(s) {', '.join(map(str, missing))} did not answer within "
            f"{timeout:.0f}s: WORK_DIR is not shared with them, or they were not started (run trainer.sh "
            f"on every node with NNODES={settings.nnodes} and its NODE_RANK), or their NNODES differs"
        )
    first = util.read_json(folder / "share.json")
    while time.time() < deadline:
        current = util.read_json(folder / "share.json")
        if isinstance(current, dict) and current != first:
            util.write_json_atomic(folder / f"ack-{settings.node_rank}.json", {"token": current["token"]})
            return None
        time.sleep(POLL_SECONDS)
    return (
        f"WORK_DIR={settings.work_dir}: node 0's token did not appear here within {timeout:.0f}s: "
        "WORK_DIR is not shared with node 0 (put it on storage every node mounts at the same path: NFS, "
        "Lustre, a shared volume), or node 0 is not running"
    )


def job_deadline(settings: config.Settings) -> float:
    return (settings.started_at or time.time()) + settings.startup_duration_timeout * 60


def wait_for(settings: config.Settings, what: str, ready) -> Any:
    """Poll `ready()` until it returns something, a node fails, or the job's time limit passes."""
    token, deadline = run_token(settings), job_deadline(settings)
    while True:
        raise_if_a_node_failed(settings, token)
        result = ready(token)
        if result is not None:
            return result
        if time.time() > deadline:
            raise NodeWaitError(
                f"node 0 did not {what} before the job's time limit "
                f"(STARTUP_DURATION_TIMEOUT={settings.startup_duration_timeout:g} minutes); "
                "see node 0's log"
            )
        time.sleep(POLL_SECONDS)


def wait_for_preparation(settings: config.Settings) -> None:
    """Node 0's prep.py for this stage finished: WORK_DIR/prep/manifest.json names this stage."""
    manifest_path = settings.prep_dir / "manifest.json"

    def ready(token):
        manifest = util.read_json(manifest_path)
        same = isinstance(manifest, dict) and manifest.get("stage_key") == settings.stage_key()
        return True if same else None

    wait_for(settings, f"prepare {settings.phase} INIT={settings.init}", ready)


def wait_for_advance(settings: config.Settings, stage_round: int) -> int:
    """`util.py advance`'s exit status on node 0 for the `stage_round`-th stage of this run (0: advanced,
    3: stopped early). Counted, not named by the stage: advancing changes the stage settings resolve to."""
    path = nodes_dir(settings) / "advanced.json"

    def ready(token):
        data = util.read_json(path)
        same = isinstance(data, dict) and (data.get("token"), data.get("round")) == (token, stage_round)
        return int(data["status"]) if same else None

    return wait_for(settings, "publish this stage", ready)


def main() -> int:
    args = sys.argv[1:]
    settings = config.settings_or_exit(quiet=True)
    folder = nodes_dir(settings)
    try:
        if args == ["wait-prep"]:
            wait_for_preparation(settings)
            print(f"nodes: node 0 prepared {settings.phase} INIT={settings.init}")
        elif len(args) == 2 and args[0] == "wait-advanced":
            print(wait_for_advance(settings, int(args[1])))
        elif len(args) == 3 and args[0] == "advanced":
            util.write_json_atomic(
                folder / "advanced.json", {"token": run_token(settings), "round": int(args[1]), "status": int(args[2])}
            )
        elif len(args) == 3 and args[0] == "failed":
            util.write_json_atomic(
                folder / "failed.json",
                {"token": run_token(settings), "node": settings.node_rank, "stage": args[1], "status": int(args[2])},
            )
        else:
            print(
                "usage: nodes.py wait-prep | wait-advanced <round> | advanced <round> <status> | "
                "failed <stage> <status>",
                file=sys.stderr,
            )
            return config.ExitCode.CONFIG
    except NodeWaitError as err:
        print(f"nodes: {err}", file=sys.stderr)
        return config.ExitCode.NODE_FAILED
    return config.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
