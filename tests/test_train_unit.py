"""Guards train.py's pieces that a whole run cannot easily provoke: a NaN loss stops training without
writing that step's checkpoint, checkpoints of another stage are never resumed, a ZeRO checkpoint is
resumed only by as many processes as wrote it (a one-line error otherwise), the DeepSpeed
configuration keeps the original's settings (with its gradient buckets trimmed to what they can hold,
and ZeRO-2 run as ZeRO-1 only for 4-bit + LoRA on one process), and precision follows the device."""
import json
import math
import signal

import pytest

import config
import train


class Control:
    should_save = True
    should_training_stop = False


class State:
    global_step, max_steps, num_input_tokens_seen = 20, 100, 40960


@pytest.fixture
def settings(tmp_path):
    return config.load_settings({"OUTPUT_DIR": str(tmp_path / "out"), "WORK_DIR": str(tmp_path / "work")})


def test_nan_loss_stops_training_and_skips_the_checkpoint(settings, tmp_path, capsys):
    pytest_handler = signal.getsignal(signal.SIGTERM)
    step_log, _ = train.make_callbacks(settings, tmp_path / "STOP")  # installs train.py's SIGTERM handler
    signal.signal(signal.SIGTERM, pytest_handler)
    step_log.on_train_begin(None, State(), Control())
    control = Control()
    step_log.on_log(None, State(), control, logs={"loss": 2.5, "learning_rate": 1e-3})
    assert control.should_save and not control.should_training_stop
    step_log.on_log(None, State(), control, logs={"loss": math.nan, "learning_rate": 1e-3})
    assert not control.should_save and control.should_training_stop
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("step     20/100 | loss   2.5000 | lr 1.000e-03 |") and "tok/s" in line and "eta" in line


def test_checkpoints_of_another_stage_are_removed_not_resumed(settings):
    old = settings.checkpoint_dir / "checkpoint-8"
    old.mkdir(parents=True)
    (settings.checkpoint_dir / "stage.json").write_text(json.dumps({**settings.stage_key(), "init": 7}))
    assert train.resume_checkpoint(settings) is None
    assert not old.exists()
    assert json.loads((settings.checkpoint_dir / "stage.json").read_text()) == settings.stage_key()


def test_checkpoints_of_the_same_stage_are_resumed(settings):
    train.resume_checkpoint(settings)
    (settings.checkpoint_dir / "checkpoint-4").mkdir()
    (settings.checkpoint_dir / "checkpoint-12").mkdir()
    assert train.resume_checkpoint(settings).endswith("checkpoint-12")


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


@pytest.mark.parametrize("trainable, processes, bucket, overlap", [
    (10**9, 1, 5 * 10**8, False),  # one process: nothing to overlap, so no second bucket
    (11_000_000, 2, 11_000_000, True),  # LoRA: a bucket holds every trained gradient, no more
    (11_000_000, 1, 11_000_000, False),
    (11_000_001, 1, 11_000_002, False),  # DeepSpeed asserts an even allgather bucket
])
def test_deepspeed_buckets_are_trimmed_to_what_they_can_hold(trainable, processes, bucket, overlap):
    zero = config.deepspeed_config(config.load_settings({"ZERO_STAGE": "2"}), "bf16", trainable,
                                   processes)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"], zero["overlap_comm"]) == (bucket, bucket, overlap)


@pytest.mark.parametrize("stage, use_quant, processes, used", [
    (2, "true", 1, 1),  # 4-bit + LoRA on one process: nothing to partition, ZeRO-1's step is cheaper
    (2, "true", 2, 2),
    (2, "false", 1, 2),
    (0, "true", 1, 0),
    (1, "true", 2, 1),
])
def test_zero_stage_drops_to_1_only_for_quantized_single_process_runs(stage, use_quant, processes, used):
    s = config.load_settings({"ZERO_STAGE": str(stage), "USE_QUANT": use_quant})
    assert config.zero_stage_for(s, processes) == used
    assert config.deepspeed_config(s, "bf16", 11_000_000, processes)["zero_optimization"]["stage"] == used


def test_a_checkpoint_resumes_only_with_the_process_count_that_wrote_it(tmp_path):
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "global_step4").mkdir(parents=True)
    assert train.checkpoint_world_size(checkpoint) is None  # ZeRO-0: nothing sharded
    train.check_resumable(checkpoint, 3)
    for rank in (0, 1):
        (checkpoint / "global_step4" / f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").touch()
    (checkpoint / "global_step4" / "mp_rank_00_model_states.pt").touch()
    assert train.checkpoint_world_size(checkpoint) == 2
    train.check_resumable(checkpoint, 2)
    with pytest.raises(SystemExit, match=r"written by 2 training process\(es\) and this run has 1.*NUM_PROCESSES=2"):
        train.check_resumable(checkpoint, 1)


def test_cpu_precision(settings):
    assert train.resolve_precision(settings) == "fp32"
    assert train.resolve_precision(config.load_settings({"PRECISION": "bf16"})) == "bf16"
