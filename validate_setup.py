"""Does this machine's software stack work? `python3 validate_setup.py`.

Numbered checks in preflight's style (✓ passed, ✗ failed, ⊘ skipped, ⚠ warning): the packages and
their versions against requirements.txt; CUDA and each GPU (or CPU only); 4-bit NF4 quantization on
the device (required with USE_QUANT); LoRA with peft; the attention kernels; DeepSpeed and the ops it
can build here; the configuration builds a model of the expected size; one forward and backward
step of a tiny LLaMA on the device. Exit status 1 when a required part is missing or broken.

`--reuse` (what trainer.sh passes): when every check passed before on this same machine boot, with the
same interpreter, packages, checking code and settings (a record in `CACHE_DIR/validated/`), say so
and skip them; a job restarted after a kill, or a new WORK_DIR on the same machine, then loses no
time to checks whose answer cannot have changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import io
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import config
import util
from preflight import (
    FAIL,
    PASS,
    SKIP,
    CheckResult,
    failed,
    nf4_round_trip_error,
    passed,
    print_result,
    quiet_bitsandbytes,
    skipped,
)

ROOT = Path(__file__).resolve().parent
# Import name -> distribution name in requirements.txt.
STACK = {
    "torch": "torch",
    "transformers": "transformers",
    "trl": "trl",
    "deepspeed": "deepspeed",
    "peft": "peft",
    "bitsandbytes": "bitsandbytes",
    "datasets": "datasets",
    "huggingface_hub": "huggingface_hub",
    "accelerate": "accelerate",
    "tokenizers": "tokenizers",
    "safetensors": "safetensors",
}
QUANT_ONLY = {"bitsandbytes"}  # required only with USE_QUANT=true


def required_ranges(path: Path = ROOT / "requirements.txt") -> dict[str, str]:
    """Distribution name (lower case) -> version specifier, from requirements.txt."""
    import re

    ranges = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"([A-Za-z0-9_.-]+)\s*(.*)", line)
        if match:
            ranges[match.group(1).lower().replace("-", "_")] = match.group(2).strip()
    return ranges


def stack_version(module: str) -> str:
    return importlib.import_module(module).__version__


def check_packages(use_quant: bool, ranges: dict[str, str] | None = None) -> CheckResult:
    """Each package imports; versions outside requirements.txt's ranges are warnings (the GPU image
    brings its own torch)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    quiet_bitsandbytes()
    ranges = required_ranges() if ranges is None else ranges
    found, missing, warnings = [], [], []
    for module, dist in STACK.items():
        try:
            version = stack_version(module)
        except Exception as err:  # a broken install raises more than ImportError
            needed = module not in QUANT_ONLY or use_quant
            (missing if needed else warnings).append(f"{module} cannot be imported ({type(err).__name__}: {err})")
            continue
        found.append(f"{module} {version}")
        wanted = ranges.get(dist.lower())
        if wanted and Version(version.split("+")[0]) not in SpecifierSet(wanted):
            warnings.append(f"{module} {version} is outside requirements.txt's {wanted}")
    if missing:
        return failed(
            missing[0],
            notes=[f"✗ {m}" for m in missing[1:]]
            + ["install the stack: pip install -r requirements.txt -c constraints.txt"],
            warnings=warnings,
        )
    return passed(", ".join(found), warnings=warnings)


def check_cuda() -> CheckResult:
    import torch

    if not torch.cuda.is_available():
        return skipped(f"CPU only (torch {torch.__version__}); training runs on CPU with DS_ACCELERATOR=cpu")
    lines = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            bf16 = torch.cuda.is_bf16_supported()
        lines.append(
            f"GPU {index}: {props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
            f"{props.major}.{props.minor}, bf16 {'yes' if bf16 else 'no (fp16 is used)'}"
        )
    return passed(f"CUDA {torch.version.cuda}, {len(lines)} GPU(s)", notes=lines)


def check_quantization(use_quant: bool) -> CheckResult:
    """NF4 round trip on the device; a failure fails only when USE_QUANT=true."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        error = nf4_round_trip_error(device)
    except Exception as err:
        message = f"bitsandbytes NF4 on {device} does not work ({type(err).__name__}: {err})"
        return failed(message) if use_quant else skipped("USE_QUANT=false", warnings=[message])
    if not math.isfinite(error) or error >= 0.15:
        message = f"NF4 round trip on {device} has relative error {error:.3f} (expected < 0.15)"
        return failed(message) if use_quant else skipped("USE_QUANT=false", warnings=[message])
    return passed(
        f"NF4 quantize/dequantize on {device}, relative error {error:.3f}"
        + ("" if use_quant else " (not needed: USE_QUANT=false)")
    )


def tiny_llama(vocab: int = 256):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    topology = config.Topology(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=vocab
    )
    model_config = LlamaConfig(**topology.llama_kwargs(), attn_implementation="sdpa")
    return LlamaForCausalLM(model_config), topology


def check_lora() -> CheckResult:
    """LoRA adapters (config.LORA_*) on the 7 projections of a tiny LLaMA: only they train."""
    from peft import LoraConfig, get_peft_model

    import memory

    model, topology = tiny_llama()
    lora = LoraConfig(
        r=config.LORA_R,
        lora_alpha=config.LORA_ALPHA,
        lora_dropout=config.LORA_DROPOUT,
        target_modules=list(config.LORA_TARGETS),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    expected = memory.lora_parameter_count(topology)
    if trainable != expected:
        return failed(
            f"peft LoRA trains {trainable:,} parameters on the tiny model, expected {expected:,} "
            f"(r={config.LORA_R} on {', '.join(config.LORA_TARGETS)})"
        )
    return passed(
        f"r={config.LORA_R} on {len(config.LORA_TARGETS)} projections: {trainable:,} trainable "
        "parameters on a tiny LLaMA, as expected"
    )


def check_attention() -> CheckResult:
    """SDPA is what the models use; on a GPU the flash / memory-efficient kernels must be enabled."""
    import torch
    from transformers import LlamaForCausalLM

    if not getattr(LlamaForCausalLM, "_supports_sdpa", False):
        return failed("this transformers' LLaMA does not support attn_implementation='sdpa'")
    query = torch.randn(1, 2, 8, 16)
    torch.nn.functional.scaled_dot_product_attention(query, query, query, is_causal=True)
    if not torch.cuda.is_available():
        return passed("sdpa (PyTorch scaled_dot_product_attention; CPU kernels)")
    backends = {
        "flash": torch.backends.cuda.flash_sdp_enabled(),
        "memory-efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "cuDNN": torch.backends.cuda.cudnn_sdp_enabled(),
    }
    enabled = [name for name, on in backends.items() if on]
    major, _ = torch.cuda.get_device_capability(0)
    warnings = (
        []
        if major >= 8
        else ["this GPU predates Ampere: no flash attention kernel; memory-efficient attention is used"]
    )
    if not (backends["flash"] or backends["memory-efficient"]):
        return failed(
            "sdpa's flash and memory-efficient kernels are both disabled: attention would store "
            "the full L x L score matrix"
        )
    return passed(f"sdpa; CUDA kernels enabled: {', '.join(enabled)}", warnings=warnings)


def check_deepspeed() -> CheckResult:
    """What ds_report tells: the accelerator, the launcher, and which ops can be built here."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    name = getattr(accelerator, "_name", type(accelerator).__name__)
    if shutil.which("deepspeed") is None:
        return failed(
            f"DeepSpeed {deepspeed.__version__} is installed but its `deepspeed` launcher is not on "
            "PATH (trainer.sh runs it); reinstall deepspeed or add its bin folder to PATH"
        )
    warnings = []
    if not torch.cuda.is_available() and name != "cpu":
        warnings.append(f"no GPU but DeepSpeed's accelerator is '{name}'; trainer.sh sets DS_ACCELERATOR=cpu")
    ops = op_compatibility()
    missing_optimizers = [op for op in ("cpu_adam", "fused_adam") if not ops.get(op)]
    warnings += [
        f"DeepSpeed op {op} cannot be built here (optional: training uses PyTorch's AdamW)" for op in missing_optimizers
    ]
    if torch.cuda.is_available() and not ninja_available():
        warnings.append("ninja is missing: DeepSpeed cannot JIT-build its CUDA ops (pip install ninja)")
    usable = ", ".join(op for op, ok in ops.items() if ok) or "none"
    return passed(
        f"DeepSpeed {deepspeed.__version__}, accelerator '{name}'; ops buildable here: {usable}", warnings=warnings
    )


def op_compatibility() -> dict[str, bool]:
    """ds_report's op table: builder.is_compatible() for each op (its chatter is kept off stdout)."""
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    result = {}
    for op_name, builder in ALL_OPS.items():
        if builder is None or op_name == "deepspeed_not_implemented":
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                result[op_name] = bool(builder.is_compatible(verbose=False))
        except Exception:  # a probe that cannot even run means the op cannot be built here
            result[op_name] = False
    return result


def ninja_available() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


def check_configuration(settings: config.Settings | None, problems: list[str]) -> CheckResult:
    """The settings load, DeepSpeed's config builds, and transformers builds a model of exactly the
    size config.Topology computes (on the meta device: no memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if settings is None:
        return failed(problems[0], notes=[f"✗ {p}" for p in problems[1:]])
    config.deepspeed_config(settings, "bf16", settings.topology.parameter_count(), max(1, settings.num_processes))
    topology = settings.topology
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**topology.llama_kwargs(), attn_implementation="sdpa"))
    built = sum(p.numel() for p in model.parameters())
    if built != topology.parameter_count():
        return failed(
            f"transformers builds {built:,} parameters for {topology.describe()}, config.py "
            f"computes {topology.parameter_count():,}"
        )
    return passed(
        f"preset {settings.preset}: {topology.describe()}, {built:,} parameters; "
        f"DeepSpeed ZeRO-{settings.zero_stage} config builds"
    )


def check_training_step() -> CheckResult:
    """One forward and backward pass of a tiny LLaMA on the device: finite loss and gradients."""
    import torch

    model, _ = tiny_llama()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = model.to(device=device, dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (2, 32), generator=generator).to(device)
    started = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    seconds = time.perf_counter() - started
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    missing = sum(g is None for g in grads)
    finite = all(g is not None and torch.isfinite(g).all().item() for g in grads)
    if not torch.isfinite(loss).item() or missing or not finite:
        return failed(
            f"forward/backward on {device}: loss {loss.item():.4f}, {missing} parameter(s) without "
            f"gradient, gradients {'finite' if finite else 'not finite'}"
        )
    expected = math.log(256)
    return passed(
        f"forward/backward of a tiny LLaMA on {device} ({str(dtype).removeprefix('torch.')}): "
        f"loss {loss.item():.3f} (random init ≈ ln 256 = {expected:.3f}), {len(grads)} gradients "
        f"finite, {seconds * 1000:.0f} ms"
    )


def load_settings() -> tuple[config.Settings | None, list[str]]:
    try:
        return config.load_settings(), []
    except config.ConfigError as err:
        return None, err.problems


def build_checks(settings: config.Settings | None, problems: list[str]) -> list[tuple[str, Callable[[], CheckResult]]]:
    use_quant = bool(settings and settings.use_quant)
    return [
        ("packages", lambda: check_packages(use_quant)),
        ("CUDA", check_cuda),
        ("4-bit quantization", lambda: check_quantization(use_quant)),
        ("LoRA", check_lora),
        ("attention", check_attention),
        ("DeepSpeed", check_deepspeed),
        ("configuration", lambda: check_configuration(settings, problems)),
        ("training step", check_training_step),
    ]


def run(check: Callable[[], CheckResult]) -> CheckResult:
    """A check that raises becomes one failed line naming the error (the stack is broken there)."""
    try:
        return check()
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else ""
        return failed(f"{type(err).__name__}: {message}"[:300])


BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
CHECKING_CODE = ("validate_setup.py", "preflight.py", "util.py", "config.py", "requirements.txt")


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_fingerprint(settings: config.Settings) -> dict:
    """What the checks' answers depend on, read without importing the stack: this boot of the machine
    (a new container or host, or other GPUs, means a new boot), the interpreter, the installed
    packages, the code of the checks, and the settings they read."""
    code = hashlib.sha256(b"".join((ROOT / name).read_bytes() for name in CHECKING_CODE)).hexdigest()
    return {
        "boot_id": BOOT_ID.read_text().strip() if BOOT_ID.is_file() else None,
        "python": [sys.executable, sys.version],
        "packages": {name: installed_version(name) for name in STACK.values()},
        "cuda_visible_devices": util.visible_gpus(),
        "code_sha256": code,
        "settings": [
            settings.use_quant,
            settings.zero_stage,
            settings.num_processes,
            config.dataclasses.asdict(settings.topology),
        ],
    }


def validation_record(settings: config.Settings) -> Path:
    """Where a passing round of checks is recorded: one file per fingerprint, in CACHE_DIR rather than
    WORK_DIR, whose contents say nothing about the machine's software."""
    text = json.dumps(environment_fingerprint(settings), sort_keys=True)
    return settings.cache_dir / "validated" / f"{hashlib.sha256(text.encode()).hexdigest()[:24]}.json"


def passed_before(settings: config.Settings) -> str | None:
    """When every check passed for this same fingerprint: the time they did."""
    try:
        saved = json.loads(validation_record(settings).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = isinstance(saved, dict) and saved.get("fingerprint") == environment_fingerprint(settings)
    return saved.get("passed_at") if same else None


def record_passed(settings: config.Settings) -> None:
    record = validation_record(settings)
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        util.write_json_atomic(record, {"passed_at": util.utc_now(), "fingerprint": environment_fingerprint(settings)})
    except OSError as err:  # a read-only home: the checks only repeat next time
        print(
            f"validate_setup: note: could not record the passed checks in {record} ({err.strerror}); "
            f"the next run repeats them"
        )


def main() -> int:
    reuse = sys.argv[1:] == ["--reuse"]
    settings, problems = load_settings()
    if reuse and settings is not None and (when := passed_before(settings)):
        print(
            f"validate_setup: every check passed at {when} with this same machine boot, software and "
            f"settings ({validation_record(settings)}); not repeated (delete that file to repeat them)"
        )
        return config.ExitCode.OK
    checks = build_checks(settings, problems)
    results: list[CheckResult] = []
    print(f"validate_setup: {len(checks)} checks of the software stack", flush=True)
    for index, (name, check) in enumerate(checks, start=1):
        results.append(run(check))
        print_result(index, len(checks), name, results[-1])
    counts = {status: sum(r.status == status for r in results) for status in (PASS, FAIL, SKIP)}
    warnings = sum(len(r.warnings) for r in results)
    print(
        f"validate_setup: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped, {warnings} warning(s)"
    )
    if counts[FAIL]:
        return config.ExitCode.FAILED
    if settings is not None:
        record_passed(settings)
    return config.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
