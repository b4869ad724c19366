"""Checks before any GPU time is spent: `python3 preflight.py`.

Every check runs (none stops the others) and prints one numbered line, `✓` passed, `✗` failed or
`⊘` skipped (with why), with `⚠` warnings below it that do not fail the run. Exit status: 0 when no
check failed, 1 when one did, 2 when the configuration itself is invalid (config.py's convention:
nothing else can be checked without settings).

The checks: the configuration; HF_TOKEN accepted by the Hub (when publishing there or on a Space);
GPU memory (or, on CPU, RAM) against an estimate for this model, batch and mode
(memory.py's `plan_batch` and `estimate_training_memory`, with `advice_to_fit` for what would fit);
OUTPUT_DIR and WORK_DIR writable; disk space for what the run writes; 4-bit quantization (with
USE_QUANT); the input model and tokenizer (runs after the first: files, a LLaMA config that fits
MAX_LENGTH, whole safetensors weights); the stage's dataset and its first rows; and sanity warnings
on the training settings. A token inside HF_ENDPOINT is never printed.

Heavy modules are imported inside the checks that need them: torch for the GPU check,
bitsandbytes only with USE_QUANT, datasets only for a dataset on the Hub.
"""

from __future__ import annotations

import itertools
import math
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import config
import memory
import util
from memory import (
    CPU_PROCESS_BYTES,
    advice_to_fit,
    cpu_precision_bytes,
    describe_estimate,
    estimate_training_memory,
    gib,
    lora_parameter_count,
    training_precision_bytes,
)

PASS, FAIL, SKIP = "pass", "fail", "skip"
SYMBOLS = {PASS: "✓", FAIL: "✗", SKIP: "⊘"}
ROWS_TO_READ = 5


@dataclass
class CheckResult:
    status: str
    detail: str
    notes: list[str] = field(default_factory=list)  # indented lines under the verdict (advice, problems)
    warnings: list[str] = field(default_factory=list)


def passed(detail: str, warnings: list[str] | None = None, notes: list[str] | None = None) -> CheckResult:
    return CheckResult(PASS, detail, notes or [], warnings or [])


def failed(detail: str, notes: list[str] | None = None, warnings: list[str] | None = None) -> CheckResult:
    return CheckResult(FAIL, detail, notes or [], warnings or [])


def skipped(detail: str, notes: list[str] | None = None, warnings: list[str] | None = None) -> CheckResult:
    return CheckResult(SKIP, detail, notes or [], warnings or [])


# Reporting Hub failures in one line.


def hub_unreachable_reason(err: BaseException) -> str | None:
    """A short reason when `err` means the Hub could not be reached (connection refused, DNS,
    timeout, offline mode); None for other errors (a 401 or 404 is an answer, not unreachability)."""
    import httpx
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set"
    chain = [err]
    while chain[-1].__cause__ is not None or chain[-1].__context__ is not None:
        nxt = chain[-1].__cause__ or chain[-1].__context__
        if nxt in chain:
            break
        chain.append(nxt)
    for item in chain:
        if isinstance(item, httpx.TimeoutException):
            return "timed out"
        if isinstance(item, (httpx.TransportError, ConnectionError)):
            return _short_reason(item)
    return None


def _short_reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for known in (
        "Connection refused",
        "Name or service not known",
        "Temporary failure in name resolution",
        "Network is unreachable",
        "No route to host",
    ):
        if known in str(err):
            return known.lower()
    return text[:120]


HUB_TIMEOUT_SECONDS, HUB_CONNECT_TIMEOUT_SECONDS = 20, 5


def hub_api(settings: config.Settings):
    """An HfApi for HF_ENDPOINT whose requests time out: huggingface_hub's shared client waits forever
    by default, and a silently dropped connection must not hang the checks."""
    from huggingface_hub import HfApi

    util.set_hub_timeout(HUB_TIMEOUT_SECONDS, connect=HUB_CONNECT_TIMEOUT_SECONDS)
    return HfApi(endpoint=settings.hf_endpoint)


def shown_endpoint(settings: config.Settings) -> str:
    """HF_ENDPOINT as messages print it: a token written into the address (`https://user:hf_...@host`)
    is replaced."""
    return util.redact(settings.hf_endpoint, settings.hf_token)


def hub_unreachable(settings: config.Settings, reason: str) -> str:
    return f"Hub unreachable at {shown_endpoint(settings)} ({reason})"


def _http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


# The checks. Each takes the settings and returns a CheckResult.


def check_configuration(settings: config.Settings, warnings: list[str]) -> CheckResult:
    topo = settings.topology
    detail = (
        f"preset {settings.preset}; {settings.phase} INIT={settings.init} (shard {settings.shard_index}, "
        f"{settings.run_epochs:g} epochs); model {topo.describe()}, "
        f"{topo.parameter_count():,} parameters"
    )
    return passed(detail, warnings=[w.removeprefix("warning: ") for w in warnings])


def check_hub_token(settings: config.Settings) -> CheckResult:
    """The token is accepted, can write, and may write to OUTPUT_REPO's owner."""
    warnings = []
    if "/" in settings.output_repo and not settings.hf_token:
        warnings.append(
            f"OUTPUT_REPO={settings.output_repo} names an owner but HF_TOKEN is unset: "
            "the model is published to OUTPUT_DIR only"
        )
    if not (settings.pushes_to_hub or settings.space_id):
        return skipped(
            "not publishing to the Hub (needs HF_TOKEN and OUTPUT_REPO=owner/name) and not on a Space",
            warnings=warnings,
        )
    if not settings.hf_token:
        return failed(
            f"SPACE_ID={settings.space_id} is set but HF_TOKEN is not: the run state cannot be kept "
            "in the Space's variables; add HF_TOKEN (write access) as a Space secret"
        )
    try:
        who = hub_api(settings).whoami(token=settings.hf_token)
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(hub_unreachable(settings, reason))
        if _http_status(err) == 401:
            return failed(
                f"HF_TOKEN was rejected by {shown_endpoint(settings)} (401 Unauthorized); create a "
                f"token with write access at {shown_endpoint(settings)}/settings/tokens"
            )
        raise
    return _judge_token(settings, who, warnings)


def _judge_token(settings: config.Settings, who: dict, warnings: list[str]) -> CheckResult:
    name = who.get("name", "?")
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return failed(
            f"HF_TOKEN (user {name}) is read-only; pushing {settings.output_repo} needs a token with write access"
        )
    if settings.pushes_to_hub:
        owner = settings.output_repo.split("/")[0]
        orgs = {org.get("name") for org in who.get("orgs") or []}
        if owner != name and owner not in orgs:
            warnings.append(
                f"OUTPUT_REPO owner '{owner}' is neither the token's user ({name}) nor one of "
                "its organizations: the push may be refused"
            )
    return passed(
        f"accepted by {shown_endpoint(settings)} as user {name}" + (f" ({role} token)" if role else ""),
        warnings=warnings,
    )


def judge_memory(estimate_kwargs: dict[str, Any], free_by_gpu: dict[str, float]) -> CheckResult:
    """Compare the estimate with the free memory of each GPU; on a shortfall, say what would fit."""
    estimate = estimate_training_memory(**estimate_kwargs)
    tightest_name, tightest_free = min(free_by_gpu.items(), key=lambda item: item[1])
    if estimate["total"] > tightest_free:
        advice = advice_to_fit(estimate_kwargs, tightest_free)
        notes = [f"would fit: {a}" for a in advice] or [
            "no single setting change fits: use more GPUs (with ZERO_STAGE=3) or a smaller model "
            "(lower FACTOR or TARGET_PARAMETERS)"
        ]
        return failed(
            f"estimated {describe_estimate(estimate)} > {gib(tightest_free)} free on {tightest_name}", notes=notes
        )
    warnings = []
    if estimate["total"] > 0.9 * tightest_free:
        warnings.append(
            f"the estimate uses {estimate['total'] / tightest_free:.0%} of {tightest_name}'s free "
            "memory; an out-of-memory error is possible"
        )
    return passed(
        f"estimated {describe_estimate(estimate)}; {gib(tightest_free)} free on {tightest_name}", warnings=warnings
    )


def judge_cpu_memory(estimate_kwargs: dict[str, Any], available_bytes: float) -> CheckResult:
    """Training on CPU: every process holds the estimate's terms (no CUDA context) and its own runtime
    in the machine's RAM, which they share; on a shortfall, say what would fit."""
    kwargs = {**estimate_kwargs, "include_cuda_overhead": False}
    processes = kwargs["world_size"]
    per_process = estimate_training_memory(**kwargs)["total"] + CPU_PROCESS_BYTES
    need = processes * per_process
    detail = (
        f"training on CPU ({processes} process(es) at {8 * kwargs['precision_bytes']}-bit) needs an "
        f"estimated {gib(need)} of RAM"
    )
    if need > available_bytes:
        advice = advice_to_fit(kwargs, available_bytes / processes - CPU_PROCESS_BYTES)
        notes = [f"would fit: {a}" for a in advice] or [
            "no single setting change fits: train on a GPU, or a smaller model (lower FACTOR or TARGET_PARAMETERS)"
        ]
        return failed(f"{detail} > {gib(available_bytes)} available", notes=notes)
    warnings = []
    if need > 0.9 * available_bytes:
        warnings.append(
            f"the estimate uses {need / available_bytes:.0%} of the available RAM; an out-of-memory kill is possible"
        )
    return passed(f"{detail}; {gib(available_bytes)} available", warnings=warnings)


def gpu_setting_problem(settings: config.Settings, world: int, count: int) -> str | None:
    """NUM_PROCESSES beyond the visible GPUs, or bf16 asked of a GPU without it; None where neither."""
    import torch

    if world > count:
        return (
            f"NUM_PROCESSES={settings.num_processes} but only {count} GPU(s) are visible; "
            "set NUM_PROCESSES=auto or at most the GPU count"
        )
    if settings.precision == "bf16" and not torch.cuda.is_bf16_supported():
        return (
            f"PRECISION=bf16 but GPU 0 ({torch.cuda.get_device_name(0)}) has no bf16 support; "
            "use PRECISION=auto (fp16 there)"
        )
    return None


def free_gpu_memory(world: int) -> dict[str, float]:
    import torch

    return {f"GPU {i} ({torch.cuda.get_device_name(i)})": torch.cuda.mem_get_info(i)[0] for i in range(world)}


def check_gpu_memory(settings: config.Settings) -> CheckResult:
    """The batch plan (memory.plan_batch, what train.py will run) and its estimate against each GPU's
    free memory, or against the available RAM when training runs on CPU."""
    gpus = memory.visible_gpu_count()
    world = settings.num_processes or max(gpus, 1)
    problem = gpu_setting_problem(settings, world, gpus) if gpus else None
    if problem:
        return failed(problem)
    try:
        plan = memory.plan_batch(settings, memory.machine_for(settings, world))
    except memory.BatchError as err:
        return failed(str(err))
    if gpus:
        result = judge_memory(plan.estimate_kwargs, free_gpu_memory(world))
    else:
        import psutil

        result = judge_cpu_memory(plan.estimate_kwargs, psutil.virtual_memory().available)
    result.notes.insert(0, memory.describe_plan(plan, settings.max_length))
    return result


# Disk.


def _folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(name: str, folder: Path) -> str | None:
    """Why the pipeline could not write into `folder`, or None: the folder, or else the nearest part of
    its path that exists (the rest is created), must be a folder this user can write into."""
    anchor = _existing_parent(folder)
    if not anchor.is_dir():
        where = "is" if anchor == folder else f"lies under {anchor}, which is"
        return f"{name}={folder}: {where} a file, not a folder; set {name} to a folder (created if missing)"
    if not os.access(anchor, os.W_OK | os.X_OK):
        return (
            f"{name}={folder}: {anchor} is not writable by this user; set {name} to a writable folder "
            "or change its permissions"
        )
    return None


def check_folders(settings: config.Settings) -> CheckResult:
    """OUTPUT_DIR and WORK_DIR can be written: otherwise prep, training or publishing fails late. On
    several nodes started one by one (no HOSTFILE), every node must see the same WORK_DIR (nodes.py)."""
    problems = [
        problem
        for problem in (
            folder_problem("OUTPUT_DIR", settings.output_dir),
            folder_problem("WORK_DIR", settings.work_dir),
        )
        if problem
    ]
    if problems:
        return failed(problems[0], notes=problems[1:])
    shared = ""
    if settings.nnodes > 1 and settings.hostfile is None:
        import nodes

        if problem := nodes.master_address_problem(settings) or nodes.check_shared_storage(settings):
            return failed(problem)
        shared = f"; WORK_DIR is shared by the {settings.nnodes} nodes"
    return passed(f"OUTPUT_DIR={settings.output_dir} and WORK_DIR={settings.work_dir} can be written{shared}")


def disk_needs(settings: config.Settings, on_gpu: bool) -> dict[str, dict[str, float]]:
    """Bytes each folder will need: the prepared data, the 32-bit prepared model and (per checkpoint)
    the trained weights twice (HF + DeepSpeed files) with fp32 master weights and Adam moments, for the
    2 kept plus the one being written, the trained model; OUTPUT_DIR: the published model. Weights are
    16-bit on a GPU and 32-bit on CPU (each as train.py trains); with SAVE_ADAPTER (and USE_QUANT) the
    LoRA adapter is also kept and published, counted in fp32."""
    params = settings.topology.parameter_count()
    lora = lora_parameter_count(settings.topology)
    trained = lora if settings.use_quant else params
    weight_bytes = training_precision_bytes(settings) if on_gpu else cpu_precision_bytes(settings)
    source = _local_dataset(config.split_dataset_spec(settings.stage_dataset)[0])
    # Text of one shard: the local data itself, or ~2 KB a row from the Hub; the prepared tokens
    # take about the same bytes (4-byte ids, ~4 characters a token), twice with assistant masks.
    text = min(_folder_bytes(source), settings.shard_size * 2048) if source else settings.shard_size * 2048
    prepared = text * (2 if settings.inst else 1)
    checkpoint = trained * (2 * weight_bytes + 12) + (params * 2 if settings.use_quant else 0)
    # USE_QUANT merges the adapter into a bf16 model before saving it.
    model = params * (2 if settings.use_quant else weight_bytes)
    work = {
        "prepared data": prepared,
        "prepared model": 4 * params,
        "checkpoints": 3 * checkpoint,
        "trained model": model,
    }
    output = {"published model": model}
    if settings.save_adapter and settings.use_quant:
        work["trained adapter"] = output["published adapter"] = 4 * lora
    return {str(settings.work_dir): work, str(settings.output_dir): output}


def check_disk(settings: config.Settings) -> CheckResult:
    needs = disk_needs(settings, on_gpu=memory.visible_gpu_count() > 0)
    by_device: dict[int, dict[str, Any]] = {}
    for folder, items in needs.items():
        anchor = _existing_parent(Path(folder))
        entry = by_device.setdefault(anchor.stat().st_dev, {"anchor": anchor, "need": 0.0, "folders": []})
        entry["need"] += sum(items.values())
        entry["folders"].append(folder)
    problems, summaries, warnings = [], [], []
    for entry in by_device.values():
        free = shutil.disk_usage(entry["anchor"]).free
        where = " and ".join(entry["folders"])
        summaries.append(f"{gib(entry['need'])} needed, {gib(free)} free for {where}")
        if entry["need"] > free:
            problems.append(
                f"{where}: needs ~{gib(entry['need'])} but {gib(free)} is free; free space or set "
                "WORK_DIR/OUTPUT_DIR to a larger disk"
            )
        elif entry["need"] > 0.8 * free:
            warnings.append(f"{where}: the run will use {entry['need'] / free:.0%} of the free space")
    breakdown = "; ".join(f"{name} {gib(size)}" for items in needs.values() for name, size in items.items())
    if problems:
        return failed(problems[0], notes=problems[1:] + [f"estimate: {breakdown}"])
    return passed("; ".join(summaries), warnings=warnings, notes=[f"estimate: {breakdown}"])


# Quantization.


def quiet_bitsandbytes() -> None:
    """bitsandbytes logs a warning about an optional CPU kernel package on import; it changes nothing."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def nf4_round_trip_error(device: str) -> float:
    """Relative error of an NF4 quantize/dequantize round trip of a random bf16 matrix."""
    import torch

    quiet_bitsandbytes()
    import bitsandbytes.functional as bnbf

    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(256, 256, generator=generator).to(device=device, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weights, quant_type="nf4", blocksize=64, compress_statistics=True)
    restored = bnbf.dequantize_4bit(packed, state).float()
    return ((restored - weights.float()).norm() / weights.float().norm()).item()


def check_quantization(settings: config.Settings) -> CheckResult:
    if not settings.use_quant:
        return skipped("USE_QUANT=false")
    quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as err:
        return failed(
            f"USE_QUANT=true but bitsandbytes cannot be imported ({err}); install it with "
            "`pip install -r requirements.txt -c constraints.txt`, or set USE_QUANT=false"
        )
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    error = nf4_round_trip_error(device)
    if not math.isfinite(error) or error >= 0.15:
        return failed(
            f"bitsandbytes {bitsandbytes.__version__}: NF4 round trip on {device} has relative error "
            f"{error:.3f} (expected < 0.15); this bitsandbytes build does not work on this device"
        )
    return passed(f"bitsandbytes {bitsandbytes.__version__}: NF4 round trip on {device}, relative error {error:.3f}")


# The input model.


def check_input_model(settings: config.Settings) -> CheckResult:
    """The model this run continues from: a local folder through prep.py's own checks (files, a LLaMA
    config that fits MAX_LENGTH, whole safetensors weights), else the Hub repository's file list."""
    if settings.first_run:
        return skipped("the first pretraining run (INIT=0) builds the model and tokenizer from scratch")
    import prep

    var = prep.source_label(settings)
    for folder in prep.local_model_candidates(settings):
        if folder.is_dir():
            try:
                prep.check_source_model(settings, folder)
            except prep.PrepError as err:
                return failed(str(err))
            return passed(f"{var}: local model and tokenizer in {folder}")
    if settings.input_repo_is_path:
        return failed(prep.no_source_folder(settings))
    return _check_hub_model(settings, var)


def _check_hub_model(settings: config.Settings, var: str) -> CheckResult:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    import prep

    where = f"no folder {prep.local_model_candidates(settings)[0]}"
    try:
        info = hub_api(settings).model_info(settings.source_repo, token=settings.hf_token)
    except GatedRepoError:
        return failed(f"{var}: {where}, and the Hub repo is gated; accept its terms with the HF_TOKEN account")
    except RepositoryNotFoundError:
        return failed(
            f"{var}: {where}, and no model {settings.source_repo} on {shown_endpoint(settings)} "
            "(or it is private and HF_TOKEN has no access); run the earlier stage first or fix INPUT_REPO"
        )
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(f"{var}: {where}; {hub_unreachable(settings, reason)}")
        raise
    files = {s.rfilename for s in info.siblings or []}
    missing = [f for f in ("config.json", "tokenizer.json") if files and f not in files]
    if missing:
        return failed(f"{var}: the Hub repo {settings.source_repo} lacks {', '.join(missing)}")
    return passed(f"{var}: model {settings.source_repo} on {shown_endpoint(settings)}")


# The dataset.


def _local_dataset(value: str | None) -> Path | None:
    if not value:
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def judge_rows(rows: list[Any], instruct: bool, var: str, where: str) -> CheckResult:
    """The first rows need a `text` column, or for instruct one of prep.INSTRUCT_COLUMNS; each row is
    checked by prep.py's own row checks, so what passes here is what preparation takes."""
    import prep

    if not rows:
        return failed(f"{var}: {where} has no rows")
    columns = sorted({str(key) for row in rows for key in row})
    if not any(name in columns for name in (prep.INSTRUCT_COLUMNS if instruct else ("text",))):
        wanted = "instruction" if instruct else "`text`"
        needs = f"; it needs one of {prep.INSTRUCT_FORMS}" if instruct else ""
        return failed(f"{var}: {where} has no {wanted} column (columns: {', '.join(columns) or 'none'}){needs}")
    row_check = prep.conversation_messages if instruct else prep.pretrain_text
    problems = []
    for number, row in enumerate(rows, 1):
        try:
            row_check(row)
        except prep.UnusableRow as err:
            problems.append(f"row {number}: {err}")
    if problems:
        return failed(f"{var}: the first rows of {where} are not usable ({'; '.join(problems[:3])})")
    return passed(f"{var}: {where}; first {len(rows)} rows usable")


def check_dataset(settings: config.Settings) -> CheckResult:
    import prep

    variable = prep.dataset_variable(settings)
    if config.MIXTURE_SEPARATOR in settings.stage_dataset:
        return _check_rows(settings, variable)  # prep's reader opens every part, Hub ones too
    base, _ = config.split_dataset_spec(settings.stage_dataset)
    if _local_dataset(base) is not None or not prep.looks_like_hub_id(base):
        return _check_rows(settings, variable)
    return _check_hub_dataset(settings, base, variable)


def _check_rows(settings: config.Settings, variable: str, hub_id: str | None = None) -> CheckResult:
    """The first rows through prep.py's own readers: the same files, formats, options and errors."""
    import prep

    try:
        source = prep.open_data_source(settings.stage_dataset, variable, settings.hf_token)
        if source.column is not None or source.parts:
            prep.check_columns(source, settings.phase)
        rows = list(itertools.islice(prep.iter_rows(source), ROWS_TO_READ))
    except prep.PrepError as err:
        return failed(str(err))
    if hub_id is not None:
        where = f"Hub dataset {hub_id} (streamed)"
    else:
        where = f"a mixture of {len(source.parts)} datasets" if source.parts else f"{len(source.files)} file(s)"
    return judge_rows(rows, settings.inst, f"{variable}={settings.stage_dataset}", where)


def _check_hub_dataset(settings: config.Settings, repo_id: str, variable: str) -> CheckResult:
    """Existence through the Hub API (clear errors), then the first rows through datasets streaming."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    var = f"{variable}={settings.stage_dataset}"
    try:
        hub_api(settings).dataset_info(repo_id, token=settings.hf_token)
    except GatedRepoError:
        return failed(f"{var}: the dataset is gated; accept its terms with the HF_TOKEN account")
    except RepositoryNotFoundError:
        return failed(f"{var}: no such local file or folder, and no dataset {repo_id} on {shown_endpoint(settings)}")
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(f"{var}: {hub_unreachable(settings, reason)}")
        raise
    return _check_rows(settings, variable, repo_id)


# Sanity warnings.


def sanity_warnings(settings: config.Settings, world_size: int) -> list[str]:
    """The original's warnings on settings that are legal but probably not meant."""
    warnings = []
    effective = memory.global_batch_for(settings, world_size)
    tokens = effective * settings.max_length
    if effective < 8:
        warnings.append(
            f"the global batch is {effective} sequences per optimizer step: very noisy gradients; "
            "raise GLOBAL_BATCH_SIZE (or GRADIENT_ACCUMULATION_STEPS)"
        )
    if tokens > 8 * 2**20:
        warnings.append(
            f"the global batch is {tokens:,} tokens per optimizer step: few steps per shard; "
            "lower GLOBAL_BATCH_SIZE (or BATCH_SIZE and GRADIENT_ACCUMULATION_STEPS)"
        )
    if not 1e-5 <= settings.learning_rate <= 1e-2:
        warnings.append(f"LEARNING_RATE={settings.learning_rate:g} is outside the usual 1e-5..1e-2")
    if settings.max_length & (settings.max_length - 1):
        warnings.append(f"MAX_LENGTH={settings.max_length} is not a power of two (slower attention kernels)")
    if settings.max_length > 8192:
        warnings.append(f"MAX_LENGTH={settings.max_length} > 8192: attention time and activation memory grow fast")
    if settings.epochs > 10:
        warnings.append(f"EPOCHS={settings.epochs:g} > 10: the model will likely memorize the shard")
    if settings.weight_decay > 0.3:
        warnings.append(f"WEIGHT_DECAY={settings.weight_decay:g} is unusually high (0.01..0.1 is common)")
    if settings.use_quant and settings.first_run:
        warnings.append(
            "USE_QUANT=true on the first pretraining run trains LoRA adapters on a random 4-bit "
            "base: the model can barely learn; pretrain in 16 bit first"
        )
    if settings.precision == "fp16":
        warnings.append("PRECISION=fp16 can overflow (NaN loss); prefer bf16 where the GPU supports it")
    if settings.timeout_buffer < 5:
        warnings.append(f"TIMEOUT_BUFFER={settings.timeout_buffer:g} minutes may be too short to save and publish")
    embeddings = 2 * config.padded_vocab(settings.vocab_size) * settings.topology.hidden_size
    if embeddings > 0.5 * settings.topology.parameter_count():
        warnings.append(
            f"embeddings are {embeddings / settings.topology.parameter_count():.0%} of the model's "
            "parameters: a smaller VOCAB_SIZE or a larger FACTOR balances it"
        )
    return warnings


def check_sanity(settings: config.Settings) -> CheckResult:
    world = settings.num_processes or memory.visible_gpu_count() or 1
    try:
        effective = memory.global_batch_for(settings, world)
    except memory.BatchError:
        return skipped("the batch settings disagree (the memory check says how)")
    warnings = sanity_warnings(settings, world)
    return passed(
        f"global batch {effective} sequences x {settings.max_length} tokens, "
        f"learning rate {settings.learning_rate:g}, {settings.run_epochs:g} epochs",
        warnings=warnings,
    )


# Running and printing.

CHECKS: tuple[tuple[str, Callable[[config.Settings], CheckResult]], ...] = (
    ("Hugging Face token", check_hub_token),
    ("memory", check_gpu_memory),
    ("output folders", check_folders),
    ("disk space", check_disk),
    ("quantization", check_quantization),
    ("input model", check_input_model),
    ("dataset", check_dataset),
    ("training settings", check_sanity),
)


def run_check(check: Callable[[config.Settings], CheckResult], settings: config.Settings) -> CheckResult:
    """One check; an unexpected error becomes a failed line (no traceback), a Hub outage one line."""
    try:
        return check(settings)
    except Exception as err:
        reason = hub_unreachable_reason(err)
        if reason:
            return failed(hub_unreachable(settings, reason))
        message = str(err).splitlines()[0] if str(err) else ""
        return failed(util.redact(f"the check itself failed: {type(err).__name__}: {message}"[:300], settings.hf_token))


def print_result(index: int, total: int, name: str, result: CheckResult) -> None:
    line = f"[{index}/{total}] {SYMBOLS[result.status]} {name}: "
    line += f"skipped ({result.detail})" if result.status == SKIP else result.detail
    print(line, flush=True)
    for note in result.notes:
        print(f"      {note}", flush=True)
    for warning in result.warnings:
        print(f"      ⚠ {warning}", flush=True)


def print_config_errors(problems: list[str], total: int) -> None:
    print(f"[1/{total}] ✗ configuration: {len(problems)} problem(s)")
    for problem in problems:
        print(f"      ✗ {problem}")
    print("preflight: the configuration is invalid; nothing else can be checked (fix it and rerun)")


def main() -> int:
    total = len(CHECKS) + 1
    environment_warnings = config.misspelling_warnings()
    try:
        settings = config.load_settings()
    except config.ConfigError as err:
        print_config_errors(err.problems, total)
        return config.ExitCode.CONFIG
    print(f"preflight: {total} checks for {settings.phase} INIT={settings.init} (preset {settings.preset})")
    results = [check_configuration(settings, environment_warnings)]
    print_result(1, total, "configuration", results[0])
    for index, (name, check) in enumerate(CHECKS, start=2):
        results.append(run_check(check, settings))
        print_result(index, total, name, results[-1])
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    warnings = sum(len(r.warnings) for r in results)
    print(f"preflight: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, {warnings} warning(s)")
    if counts[FAIL]:
        print("preflight: fix the ✗ lines above before spending GPU time")
        return config.ExitCode.FAILED
    return config.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
