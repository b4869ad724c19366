"""Guards train.py's pieces that a whole run cannot easily provoke: a NaN loss stops training without
writing that step's checkpoint, the last step is always logged, a stop file stops training with a
checkpoint, checkpoints of another stage are set aside with a line saying why (never resumed, never
deleted silently), half-written checkpoints are removed and the last complete one resumed, a finished
stage is not trained again, a full disk is recognised in the errors torch and safetensors raise, a ZeRO
checkpoint written by another number of processes goes through DeepSpeed's universal checkpoint (a
failed conversion is one line and leaves the checkpoint as it was), the DeepSpeed configuration keeps
the original's settings (with its gradient buckets trimmed to what they can hold, and ZeRO-2 run as
ZeRO-1 only for 4-bit + LoRA on one process), precision follows the device, and an evaluation gives one
line with its loss and perplexity, on a batch that gives every process a row."""

import json
import math
import re
import signal

import pytest

import callbacks
import config
import train


class Control:
    should_save = True
    should_training_stop = False


class State:
    global_step, max_steps, num_input_tokens_seen = 20, 100, 40960


def settings_env(settings) -> dict:
    return {"OUTPUT_DIR": str(settings.output_dir), "WORK_DIR": str(settings.work_dir)}


@pytest.fixture
def settings(tmp_path):
    return config.load_settings({"OUTPUT_DIR": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work")})


def test_nan_loss_stops_training_and_skips_the_checkpoint(capsys):
    step_log = callbacks.StepLog(None)
    step_log.on_train_begin(None, State(), Control())
    control = Control()
    step_log.on_log(None, State(), control, logs={"loss": 2.5, "learning_rate": 1e-3})
    assert control.should_save and not control.should_training_stop
    step_log.on_log(None, State(), control, logs={"loss": math.nan, "learning_rate": 1e-3})
    assert not control.should_save and control.should_training_stop
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("step     20/100 | loss   2.5000 | lr 1.000e-03 |") and "tok/s" in line and "eta" in line
    assert "mfu" not in line  # no peak known for the card (CPU)


def test_the_step_line_shows_mfu_where_the_cards_peak_is_known(capsys):
    step_log = callbacks.StepLog(1e-6)  # 1e6 tokens/s would be 100%
    step_log.on_train_begin(None, State(), Control())
    step_log.on_log(None, State(), Control(), logs={"loss": 2.5, "learning_rate": 1e-3})
    line = capsys.readouterr().out.splitlines()[0]
    assert re.search(r" tok/s \| mfu +\d+\.\d% \| mem ", line), line


def test_an_eval_gives_one_line_with_loss_and_perplexity(capsys):
    step_log = callbacks.StepLog(None)
    step_log.on_train_begin(None, State(), Control())
    step_log.on_log(None, State(), Control(), logs={"eval_loss": 2.0, "eval_runtime": 1.25})
    assert capsys.readouterr().out == "eval     20/100 | loss   2.0000 | perplexity      7.389 | 1.2s\n"
    assert callbacks.perplexity(800.0) == math.inf


def test_eval_losses_come_from_the_log_history():
    history = [
        {"loss": 3.0, "step": 10},
        {"eval_loss": 2.5, "eval_perplexity": 12.2, "step": 10},
        {"loss": 2.0, "step": 20},
        {"eval_loss": 1.5, "step": 20},
        {"train_loss": 2.5, "step": 20},
    ]
    assert train.logged_eval_losses(history) == [(10, 2.5), (20, 1.5)]
    assert train.logged_losses(history) == [(10, 3.0), (20, 2.0)]


@pytest.mark.parametrize(
    "rows, batch, processes, expected",
    [(64, 16, 1, 16), (64, 16, 2, 16), (20, 16, 2, 10), (3, 16, 2, 1), (1, 16, 2, None), (1, 4, 1, 1)],
)
def test_the_eval_batch_gives_every_process_at_least_one_row(rows, batch, processes, expected):
    assert train.eval_batch_size(rows, batch, processes) == expected


def test_a_stop_file_stops_every_rank_at_the_step_with_a_checkpoint(settings, tmp_path):
    pytest_handler = signal.getsignal(signal.SIGTERM)
    _, stopper, _ = train.make_callbacks(settings, tmp_path / "STOP", None)  # installs train.py's SIGTERM handler
    signal.signal(signal.SIGTERM, pytest_handler)
    args, control = type("Args", (), {"device": "cpu"})(), Control()
    control.should_save = control.should_log = False
    stopper.on_step_end(args, State(), control)
    assert stopper.stopped_by is None and not control.should_training_stop
    (tmp_path / "STOP").touch()
    stopper.on_step_end(args, State(), control)
    assert stopper.stopped_by == "signal" and control.should_training_stop and control.should_save


def test_the_last_step_is_always_logged():
    step_log = callbacks.StepLog(None)
    last, middle = Control(), Control()
    last.should_log = middle.should_log = False
    state = State()
    step_log.on_step_end(None, state, middle)
    state.global_step = state.max_steps
    step_log.on_step_end(None, state, last)
    assert (middle.should_log, last.should_log) == (False, True)


def test_the_losses_come_from_the_log_history_that_checkpoints_keep():
    history = [
        {"loss": 3.0, "step": 2},
        {"grad_norm": 1.0, "step": 2},
        {"loss": 2.5, "step": 4},
        {"train_runtime": 9.0, "step": 4},
    ]
    assert train.logged_losses(history) == [(2, 3.0), (4, 2.5)]


def complete_checkpoint(settings, step: int):
    folder = settings.checkpoint_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / train.COMPLETE_MARKER).write_text("{}")
    return folder


def test_checkpoints_of_another_stage_are_set_aside_with_the_reason(settings, capsys):
    old = complete_checkpoint(settings, 8)
    (settings.checkpoint_dir / "stage.json").write_text(json.dumps({**settings.stage_key(), "seed": 7}))
    assert train.resume_checkpoint(settings) is None
    assert not old.exists()
    assert (settings.work_dir / "checkpoints.set-aside" / "checkpoint-8" / train.COMPLETE_MARKER).is_file()
    assert json.loads((settings.checkpoint_dir / "stage.json").read_text()) == settings.stage_key()
    said = capsys.readouterr().out
    assert "belong to another stage" in said and "seed 7 -> 42" in said and "checkpoints.set-aside" in said


def test_checkpoints_of_the_stage_that_finished_training_are_removed_with_a_line(settings, capsys):
    finished_key = {**settings.stage_key(), "init": 0}
    settings.trained_dir.mkdir(parents=True)
    (settings.trained_dir / "summary.json").write_text(json.dumps({"stage_key": finished_key, "completed": True}))
    old = complete_checkpoint(settings, 8)
    (settings.checkpoint_dir / "stage.json").write_text(json.dumps(finished_key))
    assert train.resume_checkpoint(config.load_settings({**settings_env(settings), "INIT": "1"})) is None
    assert not old.exists() and not (settings.work_dir / "checkpoints.set-aside").exists()
    assert "removing the checkpoints of pretrain INIT=0 (shard 0), which finished training" in capsys.readouterr().out


def test_an_empty_checkpoint_folder_of_another_stage_is_replaced_quietly(settings, capsys):
    settings.checkpoint_dir.mkdir(parents=True)
    (settings.checkpoint_dir / "stage.json").write_text("{}")
    assert train.resume_checkpoint(settings) is None
    assert not (settings.work_dir / "checkpoints.set-aside").exists() and capsys.readouterr().out == ""


def test_the_last_complete_checkpoint_is_resumed_and_incomplete_ones_removed(settings, capsys):
    train.resume_checkpoint(settings)
    complete_checkpoint(settings, 4)
    complete_checkpoint(settings, 12)
    (settings.checkpoint_dir / "checkpoint-16").mkdir()  # killed while saving: no marker
    assert train.resume_checkpoint(settings).endswith("checkpoint-12")
    assert not (settings.checkpoint_dir / "checkpoint-16").exists()
    assert "checkpoint-16 is incomplete" in capsys.readouterr().out


def test_a_finished_stage_is_not_trained_again(settings):
    assert train.finished_summary(settings) is None
    summary = {"stage_key": settings.stage_key(), "completed": True, "steps": 40, "final_loss": 2.0}
    settings.trained_dir.mkdir(parents=True)
    (settings.trained_dir / "summary.json").write_text(json.dumps(summary))
    assert train.finished_summary(settings) == summary
    for other in ({**summary, "completed": False}, {**summary, "stage_key": {**settings.stage_key(), "init": 3}}):
        (settings.trained_dir / "summary.json").write_text(json.dumps(other))
        assert train.finished_summary(settings) is None


def test_a_full_disk_is_recognised_in_the_errors_of_each_writer():
    import errno

    assert train.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert train.disk_full(wrapped)
    assert train.disk_full(Exception("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not train.disk_full(RuntimeError("CUDA error: an illegal memory access"))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_config_keeps_the_original_settings(stage):
    s = config.load_settings({"ZERO_STAGE": str(stage)})
    ds = config.deepspeed_config(s, "bf16", 10**9, 2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    if stage:
        assert zero["overlap_comm"] and zero["contiguous_gradients"]
        assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 5e8
    assert ds["gradient_clipping"] == "auto"  # filled from max_grad_norm=1.0 by the Trainer
    assert config.deepspeed_config(s, "fp16", 10**9, 2)["fp16"]["loss_scale"] == 0  # dynamic loss scaling


@pytest.mark.parametrize(
    "trainable, processes, bucket, overlap",
    [
        (10**9, 1, 5 * 10**8, False),  # one process: nothing to overlap, so no second bucket
        (11_000_000, 2, 11_000_000, True),  # LoRA: a bucket holds every trained gradient, no more
        (11_000_000, 1, 11_000_000, False),
        (11_000_001, 1, 11_000_002, False),  # DeepSpeed asserts an even allgather bucket
    ],
)
def test_deepspeed_buckets_are_trimmed_to_what_they_can_hold(trainable, processes, bucket, overlap):
    zero = config.deepspeed_config(config.load_settings({"ZERO_STAGE": "2"}), "bf16", trainable, processes)[
        "zero_optimization"
    ]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"], zero["overlap_comm"]) == (
        bucket,
        bucket,
        overlap,
    )


@pytest.mark.parametrize(
    "stage, use_quant, processes, used",
    [
        (2, "true", 1, 1),  # 4-bit + LoRA on one process: nothing to partition, ZeRO-1's step is cheaper
        (2, "true", 2, 2),
        (2, "false", 1, 2),
        (0, "true", 1, 0),
        (1, "true", 2, 1),
    ],
)
def test_zero_stage_drops_to_1_only_for_quantized_single_process_runs(stage, use_quant, processes, used):
    s = config.load_settings({"ZERO_STAGE": str(stage), "USE_QUANT": use_quant})
    assert config.zero_stage_for(s, processes) == used
    assert config.deepspeed_config(s, "bf16", 11_000_000, processes)["zero_optimization"]["stage"] == used


def test_a_checkpoint_of_another_process_count_is_converted_and_a_failed_conversion_keeps_it(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    (checkpoint / "latest").write_text("global_step4")
    assert train.checkpoint_world_size(checkpoint) is None  # ZeRO-0: nothing sharded
    assert not train.needs_universal(checkpoint, 3)
    for rank in (0, 1):
        (checkpoint / "global_step4" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    (checkpoint / "global_step4" / "mp_rank_00_model_states.pt").touch()
    assert train.checkpoint_world_size(checkpoint) == 2
    assert not train.needs_universal(checkpoint, 2) and train.needs_universal(checkpoint, 1)
    # Empty state files cannot be converted: one line naming the checkpoint and the way on, and the
    # checkpoint is left as it was (no converted folder, no temporary one).
    before = sorted(p.relative_to(checkpoint) for p in checkpoint.rglob("*"))
    failed = (
        r"^train: converting \S+checkpoint-4 \(written by 2 process\(es\)\) to DeepSpeed's universal "
        r"checkpoint failed: .*NUM_PROCESSES=2"
    )
    with pytest.raises(SystemExit, match=failed):
        train.convert_to_universal(checkpoint, 1)
    assert sorted(p.relative_to(checkpoint) for p in checkpoint.rglob("*")) == before


def test_cpu_precision(settings):
    assert train.resolve_precision(settings) == "fp32"
    assert train.resolve_precision(config.load_settings({"PRECISION": "bf16"})) == "bf16"
