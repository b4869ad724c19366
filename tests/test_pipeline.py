"""Guards the whole product end to end on CPU: trainer.sh walks the demo curriculum to a working
instruction-tuned model, with its TensorBoard losses, loss plot and model card; two "nodes"
(trainer.sh twice, NNODES=2) train like one node with two processes and publish once; two-process
DeepSpeed ZeRO-2 checkpoints, one of them left by kill -9, resume on one process and one process's on
two, continuing the same train and eval loss curve at the same global batch; 4-bit + LoRA training
resumes exactly after kill -9; the trimmed
gradient buckets train exactly like the original's; SEED repeats a 4-bit + LoRA run; the 4-bit +
LoRA curriculum trains the chat markers' rows, publishes plain models to the Hub stand-in after a failed
push and never shows the token; the timer stops training cleanly and publishes a loss even before the
first logging interval."""

import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import remove_unmapped_deepspeed_buffers

import util
from config import CHAT_TOKENS

pytestmark = pytest.mark.slow


def run_trainer(root, env, timeout=900):
    # trainer.sh runs `python3` and `deepspeed` from PATH: those of this interpreter's environment.
    env = {**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"}
    result = subprocess.run(["bash", "trainer.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    return log


# An eval line: its step and loss.
EVAL_LINE = re.compile(r"^eval +(\d+)/\d+ \| loss +([\d.]+)", flags=re.M)


def step_losses(log: str) -> dict[int, float]:
    """step -> loss from the fixed-format step lines."""
    return {
        int(m.group(1)): float(m.group(2))
        for m in re.finditer(r"^step\s+(\d+)/\d+ \| loss\s+([-\d.naif]+)", log, flags=re.M)
    }


def generate_text(model_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_demo_curriculum_produces_a_working_instruction_model(base_env, root, tmp_path):
    from evaluate import heldout_accuracy

    started = time.time()
    log = run_trainer(root, base_env)
    output = Path(base_env["OUTPUT_DIR"])
    state = json.loads((output / "run_state.json").read_text())
    assert state["done"] is True
    walked = [entry["trained"] for entry in state["history"]]
    assert len(walked) == 4 and "pretrain" in walked[0] and "instruct" in walked[-1], walked

    # Loss falls: pretraining ends well below its first logged loss, and the second instruction
    # stage ends below the first one's start.
    losses = [entry["final_loss"] for entry in state["history"]]
    stage_logs = log.split("=== train")[1:]
    first_losses = [next(iter(step_losses(stage).values())) for stage in stage_logs]
    assert losses[1] < first_losses[0] - 1.0, (first_losses, losses)
    assert losses[3] < first_losses[2], (first_losses, losses)

    for name in ("train-llama", "train-llama-it"):
        folder = output / name
        config = json.loads((folder / "config.json").read_text())
        assert "quantization_config" not in config
        assert generate_text(folder, "<|user|>Repeat: cat<|end|><|bot|>").strip() != ""

    check_tracking_plot_and_card(Path(base_env["WORK_DIR"]), output, log)

    pretrained = heldout_accuracy(output / "train-llama")
    tuned = heldout_accuracy(output / "train-llama-it")
    print(
        f"held-out accuracy: pretrained only {pretrained:.1%}, instruction-tuned {tuned:.1%}; "
        f"whole curriculum in {time.time() - started:.0f}s"
    )
    assert tuned >= pretrained + 0.15


def check_tracking_plot_and_card(work: Path, output: Path, log: str) -> None:
    """What the demo's four stages leave besides the models: TensorBoard's train and eval losses of each
    stage (equal to the step and eval lines), the curriculum's loss history with one series per stage and
    its plot, and a model card whose metadata huggingface_hub reads back with the eval results."""
    import matplotlib.image
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    stage_logs = log.split("=== train")[1:]
    stages = ["pretrain-init0", "pretrain-init1", "instruct-init0", "instruct-init1"]
    assert sorted(p.name for p in (work / "tensorboard").iterdir()) == sorted(stages)
    for stage, stage_log in zip(stages, stage_logs):
        events = EventAccumulator(str(work / "tensorboard" / stage))
        events.Reload()
        train = {e.step: e.value for e in events.Scalars("train/loss")}
        evals = {e.step: e.value for e in events.Scalars("eval/loss")}
        assert train == pytest.approx(step_losses(stage_log), abs=1e-4), stage
        logged_evals = {int(step): float(loss) for step, loss in EVAL_LINE.findall(stage_log)}
        assert evals and evals == pytest.approx(logged_evals, abs=1e-4), stage
        assert {e.step for e in events.Scalars("eval/perplexity")} == set(evals)

    published = output / "train-llama-it"
    history = json.loads((published / "loss_history.json").read_text())["stages"]
    assert [(s["phase"], s["init"]) for s in history] == [
        ("pretrain", 0),
        ("pretrain", 1),
        ("instruct", 0),
        ("instruct", 1),
    ]
    assert all(s["train"] and s["eval"] for s in history)
    assert matplotlib.image.imread(published / "loss_curve.png").shape == (450, 800, 4)
    summary = json.loads((work / "trained" / "summary.json").read_text())
    assert summary["eval_sequences"] == 64 and summary["eval_losses"][-1] == history[-1]["eval"][-1]
    card = ModelCard.load(published / "README.md")
    loss, perplexity = card.data.eval_results
    assert (loss.metric_type, loss.metric_value) == ("loss", round(summary["eval_loss"], 4))
    assert perplexity.metric_value == pytest.approx(math.exp(summary["eval_loss"]), rel=1e-3)
    assert card.data.license == "mit" and card.data.datasets is None  # the demo's data are local files
    assert "![Training and eval loss of every stage so far](loss_curve.png)" in card.text
    assert card.text.count("**This model's answer**") == 3


def prepare_twice(root, env, tmp_path) -> dict:
    """Prepares a run in env's WORK_DIR and copies the preparation to a second work folder, for a
    second run of the same stage; returns that run's environment."""
    result = subprocess.run([sys.executable, "prep.py"], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    shutil.copytree(Path(env["WORK_DIR"]) / "prep", tmp_path / "work2" / "prep")
    return {**env, "WORK_DIR": str(tmp_path / "work2")}


def launch_training(root, env, processes=2, script=("train.py",)):
    env = {**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(2 // processes)}
    # DeepSpeed's CPU all-reduce names its shared memory by the master port: a killed run's buffers
    # must not meet a new run that the system gives the same port.
    remove_unmapped_deepspeed_buffers()
    port = str(util.free_port())  # a free port for each launch: a killed run's port may linger
    return subprocess.Popen(
        ["deepspeed", "--master_port", port, "--num_gpus", str(processes), *script],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill_after_checkpoint_4_and_resume(root, env, tmp_path, processes):
    """An uninterrupted 8-step run, and one killed (-9) once checkpoint-4 exists and then resumed:
    the step losses of the uninterrupted run, of the resumed one and of the killed one before the kill."""
    uninterrupted_env = prepare_twice(root, env, tmp_path)
    reference = launch_training(root, uninterrupted_env, processes)
    reference_log = reference.communicate(timeout=600)[0]
    assert reference.returncode == 0, reference_log[-4000:]

    crashing = launch_training(root, env, processes)
    checkpoint = Path(env["WORK_DIR"]) / "checkpoints" / "checkpoint-4"
    deadline = time.time() + 300
    while not (checkpoint / "train-llama-complete.json").exists():
        assert time.time() < deadline and crashing.poll() is None, "no checkpoint-4 was written"
        time.sleep(0.2)
    os.killpg(crashing.pid, signal.SIGKILL)
    crashed_log = crashing.communicate()[0]

    resumed = launch_training(root, env, processes)
    resumed_log = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, resumed_log[-4000:]
    assert "resuming from" in resumed_log and "checkpoint-" in resumed_log
    return step_losses(reference_log), step_losses(resumed_log), step_losses(crashed_log)


def test_two_nodes_and_zero2_checkpoints_of_another_process_count_follow_one_curve(base_env, root, tmp_path):
    # The global batch (16) is fixed; the processes change and with them the per-process batch: two
    # processes x micro-batch 4 x 2 accumulation, or one x micro-batch 8 x 2. A small shard (82
    # sequences, 5 steps an epoch) so that the runs cross an epoch boundary, where the Trainer's
    # sampler must pick up at the same sequence whatever the split.
    # 1. Two "nodes" on this machine (trainer.sh twice side by side, NNODES=2, one process each,
    #    sharing WORK_DIR and OUTPUT_DIR): node 0 alone prepares, publishes and advances; the curve.
    # 2. One node with two processes on that preparation, killed (-9) once checkpoint-2 is complete:
    #    its steps 1-2 are the two nodes' steps.
    # 3. Its checkpoint resumed by one process: the ZeRO-2 state of two is converted to DeepSpeed's
    #    universal checkpoint (after a conversion killed midway), and steps 3-8 continue the curve.
    # 4. checkpoint-6 of that one process, resumed by two: steps 7-8 continue the curve.
    two, one = (
        {"BATCH_SIZE": "4", "GRADIENT_ACCUMULATION_STEPS": "2"},
        {"BATCH_SIZE": "8", "GRADIENT_ACCUMULATION_STEPS": "2"},
    )
    # Two of the 82 sequences are held out for the eval loss: 80 keep every epoch's micro-batches whole.
    env = {
        **base_env,
        **two,
        "SHARD_SIZE": "200",
        "MAX_STEPS": "8",
        "SAVE_STEPS": "2",
        "LOGGING_STEPS": "1",
        "EVAL_ROWS": "2",
        "RUN_ALL": "false",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}",
    }
    reference_losses, reference_eval = train_on_two_nodes(root, env, tmp_path)

    # One node from here on, with its own run state (the two nodes advanced theirs past this stage).
    env = {**env, "WORK_DIR": str(tmp_path / "work2"), "OUTPUT_DIR": str(tmp_path / "output2")}
    shutil.copytree(Path(base_env["WORK_DIR"]) / "prep", tmp_path / "work2" / "prep")
    checkpoints = tmp_path / "work2" / "checkpoints"
    crashing = launch_training(root, env, processes=2)
    deadline = time.time() + 300
    while not (checkpoints / "checkpoint-2" / "train-llama-complete.json").exists():
        assert time.time() < deadline and crashing.poll() is None, "no checkpoint-2 was written"
        time.sleep(0.2)
    os.killpg(crashing.pid, signal.SIGKILL)
    crashed_losses = step_losses(crashing.communicate()[0])
    assert sorted(crashed_losses)[:2] == [1, 2]
    for step, loss in crashed_losses.items():
        assert loss == pytest.approx(reference_losses[step], rel=1e-4), (crashed_losses, reference_losses)

    def resume(processes, batch, first_step):
        run = launch_training(root, {**env, **batch}, processes=processes)
        log = run.communicate(timeout=600)[0]
        assert run.returncode == 0, log[-4000:]
        converted = (
            rf"^train: checkpoint-{first_step - 1} was written by {3 - processes} training "
            rf"process\(es\) and this run has {processes}: converted its ZeRO state to DeepSpeed's "
            r"universal checkpoint in [\d.]+s \(\S+global_step\d+_universal\); resuming from it$"
        )
        assert re.search(converted, log, flags=re.M), log[-4000:]
        losses = step_losses(log)
        assert sorted(losses) == list(range(first_step, 9)), log[-4000:]
        for step, loss in losses.items():
            assert loss == pytest.approx(reference_losses[step], abs=1e-3), (processes, losses, reference_losses)
        # The final eval loss: one row on each of two processes, or both in one batch on one.
        assert float(EVAL_LINE.findall(log)[-1][1]) == pytest.approx(reference_eval, abs=1e-3)
        return log

    # A conversion killed midway left its temporary folder, named in `latest_universal`: the next run
    # removes it and converts again.
    killed = checkpoints / "checkpoint-2" / ".global_step2_universal.tmp-killed"
    (killed / "zero").mkdir(parents=True)
    (checkpoints / "checkpoint-2" / "latest_universal").write_text(killed.name)
    log = resume(1, one, first_step=3)
    assert f"removed a temporary folder left by an interrupted run: {killed}" in log
    # The stage finished: without its trained model and its last checkpoint, a rerun resumes checkpoint-6.
    shutil.rmtree(tmp_path / "work2" / "trained")
    shutil.rmtree(checkpoints / "checkpoint-8")
    resume(2, two, first_step=7)


def train_on_two_nodes(root, env, tmp_path) -> tuple[dict[int, float], float]:
    """trainer.sh on two "nodes" side by side (one process each); the step losses and the final eval
    loss, after checking that both saw the shared WORK_DIR and that node 0 alone prepared, published
    and advanced."""
    env = {**env, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(util.free_port()), "NUM_PROCESSES": "1"}
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with open(log, "w") as out:
            node_env = {**env, "NODE_RANK": str(rank)}
            nodes.append(
                subprocess.Popen(["bash", "trainer.sh"], cwd=root, env=node_env, stdout=out, stderr=subprocess.STDOUT)
            )
    codes = [node.wait(timeout=900) for node in nodes]
    node0, node1 = (log.read_text() for log in logs)
    assert codes == [0, 0], (node0[-3000:], node1[-3000:])
    assert "WORK_DIR is shared by the 2 nodes" in node0 and "WORK_DIR is shared by the 2 nodes" in node1
    assert "=== publish" in node0 and "=== publish" not in node1
    assert "nodes: node 0 prepared pretrain INIT=0" in node1 and "=== wait for node 0 to publish" in node1
    state = json.loads((Path(env["OUTPUT_DIR"]) / "run_state.json").read_text())
    assert len(state["history"]) == 1 and (Path(env["OUTPUT_DIR"]) / "train-llama" / "publish.json").is_file()
    losses = step_losses(node0)
    assert sorted(losses) == list(range(1, 9)) and not step_losses(node1)  # only global rank 0 logs
    return losses, float(EVAL_LINE.findall(node0)[-1][1])


def test_seed_repeats_a_quantized_run_and_it_resumes_exactly_after_kill(base_env, root, tmp_path):
    # SEED: LoRA's adapters are drawn when train.py attaches them, before the Trainer seeds, and torch
    # seeds itself randomly at start-up. While the adapters' B is zero the losses agree whatever A is;
    # from the third step (after the first update with a non-zero learning rate) they differ unless
    # SEED fixed A: the killed run's steps 1-4 must repeat the uninterrupted run's.
    # Resuming: the resumed run attaches fresh adapters to the NF4 base and then loads the
    # checkpoint's: every step after checkpoint-4 must match the uninterrupted run's.
    env = {
        **base_env,
        "USE_QUANT": "true",
        "MAX_STEPS": "8",
        "SAVE_STEPS": "4",
        "LOGGING_STEPS": "1",
        "PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}",
    }
    reference_losses, resumed_losses, crashed_losses = kill_after_checkpoint_4_and_resume(
        root, env, tmp_path, processes=1
    )
    assert [1, 2, 3, 4] == sorted(crashed_losses)[:4]
    assert {step: reference_losses[step] for step in crashed_losses} == crashed_losses
    assert sorted(resumed_losses) == [5, 6, 7, 8], "the resumed run did not continue after checkpoint-4"
    assert {step: reference_losses[step] for step in resumed_losses} == resumed_losses


def test_trimmed_buckets_train_exactly_like_the_originals(base_env, root, tmp_path):
    # config.deepspeed_buckets drops memory, not arithmetic: one process, ZeRO-2 with gradient
    # accumulation, against the original's two overlapped 5e8-element buckets (tests/original_buckets.py).
    # bf16, because DeepSpeed runs its overflow check only in reduced precision.
    env = {
        **base_env,
        "MAX_STEPS": "5",
        "LOGGING_STEPS": "1",
        "SAVE_STEPS": "5",
        "BATCH_SIZE": "2",
        "GRADIENT_ACCUMULATION_STEPS": "2",
        "PRECISION": "bf16",
        "PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}",
    }
    original_env = prepare_twice(root, env, tmp_path)
    trimmed = launch_training(root, env, processes=1)
    trimmed_log = trimmed.communicate(timeout=600)[0]
    original = launch_training(root, original_env, processes=1, script=("tests/original_buckets.py",))
    original_log = original.communicate(timeout=600)[0]
    assert trimmed.returncode == 0 and original.returncode == 0, (trimmed_log[-2000:], original_log[-2000:])
    assert "500,000,000-element gradient buckets, overlapped" in original_log
    assert re.search(r"bf16, ZeRO-2 \([\d,]+-element gradient buckets\)", trimmed_log)
    trimmed_losses, original_losses = step_losses(trimmed_log), step_losses(original_log)
    assert len(trimmed_losses) == 5 and trimmed_losses == original_losses
    norms, original_norms = (
        [
            entry["grad_norm"]
            for entry in json.loads(
                (Path(e["WORK_DIR"]) / "checkpoints" / "checkpoint-5" / "trainer_state.json").read_text()
            )["log_history"]
            if "grad_norm" in entry
        ]
        for e in (env, original_env)
    )
    assert len(norms) == 5 and norms == pytest.approx(original_norms, rel=1e-5)
    assert min(norms) > 1.0  # above the clipping threshold: the norm scaled every update


def instruction_files_in_three_formats(root: Path, folder: Path) -> str:
    """The embedded instruction set split into ShareGPT, Alpaca and prompt/completion files (one turn
    each); returns the INSTRUCT_DATASET value that mixes them."""
    pattern = re.compile(r"<\|user\|>(.*?)<\|end\|><\|bot\|>(.*?)<\|end\|>", flags=re.S)
    turns = [
        pattern.match(json.loads(line)["text"]).groups()
        for line in (root / "data" / "instruct.jsonl").read_text().splitlines()
    ]
    forms = {
        "sharegpt": lambda q, a: {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]},
        "alpaca": lambda q, a: {"instruction": q, "input": "", "output": a},
        "completion": lambda q, a: {"prompt": q, "completion": a},
    }
    for index, (name, form) in enumerate(forms.items()):
        rows = [json.dumps(form(q, a)) for q, a in turns[index::3]]
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
    return "|".join(str(folder / f"{name}.jsonl") for name in forms)


def pretraining_dataset_with_configs(root: Path) -> dict[str, bytes]:
    """The embedded pretraining corpus as a Hub dataset repository: config `en` (splits train and
    test) and a decoy config `la`, in parquet files declared by the card's YAML, as on the Hub."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from test_hub_datasets import readme

    def parquet(texts):
        buffer = io.BytesIO()
        pq.write_table(pa.table({"body": texts}), buffer)
        return buffer.getvalue()

    texts = [json.loads(line)["text"] for line in (root / "data" / "pretrain.jsonl").read_text().splitlines()]
    return {
        "README.md": readme(
            {"en": {"train": "en/train-*.parquet", "test": "en/test.parquet"}, "la": {"train": "la/train.parquet"}}
        ),
        "en/train-00000.parquet": parquet(texts[: len(texts) // 2]),
        "en/train-00001.parquet": parquet(texts[len(texts) // 2 :]),
        "en/test.parquet": parquet(["never read"]),
        "la/train.parquet": parquet(["never read"]),
    }


def test_quantized_curriculum_publishes_plain_models_and_never_shows_the_token(base_env, root, tmp_path):
    """The whole 4-bit curriculum pushed to the Hub stand-in from a Space: the first run's push fails
    (the Hub answers 503 to every commit), the second run publishes that stage without training it
    again and walks the rest; the token is in no log line, file or request of either. Its data are
    real users' forms: pretraining streams a config, split and column of a Hub dataset from the
    stand-in, and instruction tuning mixes ShareGPT, Alpaca and prompt/completion files."""
    from hub_server import HubStandIn
    from test_publish import SPACE, TOKEN, assert_token_absent

    with HubStandIn(token=TOKEN, user="tester") as hub:
        hub.add_space(SPACE)
        hub.add_dataset("tester/corpus", pretraining_dataset_with_configs(root))
        # huggingface_hub refuses every request while either offline variable is set.
        offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
        env = {
            **{k: v for k, v in base_env.items() if k not in offline},
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_DISABLE_XET": "1",
            "HF_TOKEN": TOKEN,
            "SPACE_ID": SPACE,
            "HF_UPDATE_DOWNLOAD_COUNTS": "false",
            "INPUT_DATASET": "tester/corpus?config=en&split=train&column=body",
            "INSTRUCT_DATASET": instruction_files_in_three_formats(root, tmp_path),
            "OUTPUT_REPO": "tester/train-llama",
            "PRESET": "demo",
            "MAX_RETRIES": "2",
            "USE_QUANT": "true",
            "MAX_STEPS": "2",
            "LOGGING_STEPS": "1",
            "SAVE_STEPS": "2",
            "PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}",
        }
        # The commit, which huggingface_hub does not retry by itself (preupload it retries for ~30 s).
        hub.fail_always(503, path_contains="/commit/")
        failed = subprocess.run(["bash", "trainer.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert failed.returncode == 1 and "the run state was not advanced" in failed.stderr, failed.stderr[-3000:]
        hub.heal()
        finished = subprocess.run(
            ["bash", "trainer.sh"], cwd=root, env=env, capture_output=True, text=True, timeout=900
        )
        assert finished.returncode == 0, (finished.stdout + finished.stderr)[-6000:]
        assert "already finished training" in finished.stdout
        assert set(hub.repos) == {"tester/train-llama", "tester/train-llama-it"}
        assert hub.spaces[SPACE].stage == "PAUSED"
        assert_token_absent(env, hub, failed, finished)
        read = {r.path.split("/", 6)[-1] for r in hub.requests_to("GET", r"/datasets/tester/corpus/resolve/.*")}
        assert {"en/train-00000.parquet", "en/train-00001.parquet"} <= read, read
        assert not read & {"en/test.parquet", "la/train.parquet"}, read
        assert not [(r.method, r.path) for r in hub.unrouted]
    log = finished.stdout
    # Every row of the three formats was usable: the mixture (equal weights, until one file runs out)
    # holds more rows than any one file has.
    mixed = [
        int(rows.replace(",", ""))
        for rows, skipped in re.findall(r"prep done: ([\d,]+) rows, ([\d,]+) skipped", log)
        if skipped == "0"
    ]
    assert len(mixed) >= 2 and min(mixed[-2:]) > 5000 // 3 + 1, mixed
    output = Path(env["OUTPUT_DIR"])
    assert json.loads((output / "run_state.json").read_text())["done"] is True
    assert "4-bit NF4 base + LoRA" in log
    # The last instruction stage trained the chat markers' input and output rows, and no other row.
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    prepared = load_file(Path(env["WORK_DIR"]) / "prep" / "model" / "model.safetensors")
    published = load_file(output / "train-llama-it" / "model.safetensors")
    tokenizer = AutoTokenizer.from_pretrained(output / "train-llama-it")
    chat_ids = sorted(tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS)))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        moved = (published[name].float() != prepared[name].float()).any(dim=1).nonzero().flatten().tolist()
        assert moved == chat_ids, (name, moved, chat_ids)
    for name in ("train-llama", "train-llama-it"):
        config = json.loads((output / name / "config.json").read_text())
        assert "quantization_config" not in config
        assert not list((output / name).glob("adapter_*"))
    # peft and bitsandbytes made unimportable (a None entry in sys.modules), as on a plain machine.
    blocked = (
        "import sys\n"
        "sys.modules.update(peft=None, bitsandbytes=None)\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(output / 'train-llama-it')!r})\n"
        "print(type(m).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert result.returncode == 0 and "LlamaForCausalLM" in result.stdout, result.stderr[-2000:]


def test_timer_stops_training_and_publishes_without_advancing(base_env, root):
    # A timeout already over when training starts: the first step is the last, before the first
    # LOGGING_STEPS interval, and its loss is still logged and published. Preparation counts toward the
    # limit too (it would stop first), so it is done beforehand, on time, and the job's run reuses it.
    env = {
        **base_env,
        "RUN_ALL": "false",
        "STARTUP_DURATION_TIMEOUT": "1m",
        "TIMEOUT_BUFFER": "0.5",
        "LOGGING_STEPS": "10",
        "SAVE_STEPS": "10",
    }
    prepared = subprocess.run([sys.executable, "prep.py"], cwd=root, env=env, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    env["TRAINER_STARTED_AT"] = str(time.time() - 60)
    log = run_trainer(root, env)
    assert "already holds this stage's preparation; reusing it" in log, log[-3000:]
    assert "Timer stop at step 1" in log and list(step_losses(log)) == [1]
    output = Path(env["OUTPUT_DIR"])
    assert (output / "train-llama" / "config.json").is_file()
    assert json.loads((output / "train-llama" / "publish.json").read_text())["final_loss"] > 0
    assert not (output / "run_state.json").exists() or json.loads((output / "run_state.json").read_text())["init"] == 0


def test_sigterm_saves_publishes_and_keeps_the_stage(base_env, root, tmp_path):
    """A Space or container being stopped: trainer.sh gets SIGTERM while training runs."""
    env = {
        **base_env,
        "RUN_ALL": "false",
        "LOGGING_STEPS": "1",
        "SAVE_STEPS": "1000",
        "PATH": f"{Path(sys.executable).parent}:{base_env['PATH']}",
    }
    log_path = tmp_path / "trainer.log"
    with open(log_path, "w") as log_file:
        trainer = subprocess.Popen(["bash", "trainer.sh"], cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not re.search(r"^step\s+2/", log_path.read_text(), flags=re.M):
            assert time.time() < deadline and trainer.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.5)
        trainer.send_signal(signal.SIGTERM)
        assert trainer.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    assert re.search(r"Timer stop at step \d+ \(signal\)", log)
    output = Path(env["OUTPUT_DIR"])
    assert (output / "train-llama" / "config.json").is_file()
    assert "stopped early" in (output / "train-llama" / "README.md").read_text()
    assert not (output / "run_state.json").exists()
    checkpoints = list((Path(env["WORK_DIR"]) / "checkpoints").glob("checkpoint-*"))
    assert checkpoints, "the stop saved no checkpoint to resume from"
