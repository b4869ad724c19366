"""Baseline for BENCHMARKS.md: the same LLaMA shape trained by stock TRL SFTTrainer on one GPU, with
none of this pipeline's code beyond the topology (no DeepSpeed, no prep.py, no train.py). With
--quant the base is loaded through transformers' BitsAndBytesConfig (NF4, double quantization, bf16
compute) and trained with peft LoRA r=16 on every projection, the usual QLoRA recipe.

The rows are already packed (random token ids, every row exactly --length long), so no padding and
no per-shape attention set-up. Prints one line: tokens/s and torch's peak allocated memory; --json
also writes them to a file. A step's time is the whole cycle from one optimizer step's end to the next
(batch loading, forward, backward, optimizer, logging), which is what the pipeline's step lines measure
too. Like speed.py for those lines, the tokens/s is the median over windows of --logging-steps steps
(each step line covers LOGGING_STEPS steps), after the first --warmup steps.
Usage: python3 benchmarks/stock_trl.py --hidden 2048 --vocab-rows 1216 --batch 4 --length 2048 --quant
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import config  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, required=True, help="hidden size; config.py picks the rest")
    parser.add_argument("--vocab-rows", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--logging-steps", type=int, default=2, help="steps per measured window, as LOGGING_STEPS")
    parser.add_argument("--quant", action="store_true", help="NF4 base + LoRA instead of full bf16")
    parser.add_argument("--checkpointing", action="store_true", help="activation (gradient) checkpointing")
    parser.add_argument("--liger", action="store_true", help="Liger's kernels through TRL's use_liger_kernel")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (a smoke test of the script)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    return parser.parse_args()


def build_model(args: argparse.Namespace, folder: Path):
    """A random-init LLaMA saved to `folder` and loaded back the stock way (4-bit when --quant)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    topology = config.topology_for_hidden(args.hidden, args.vocab_rows)
    model_config = LlamaConfig(**topology.llama_kwargs(args.vocab_rows), max_position_embeddings=args.length)
    torch.manual_seed(0)
    LlamaForCausalLM(model_config).to(torch.bfloat16).save_pretrained(folder)
    if not args.quant:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        quantization_config=quantization,
        dtype=torch.bfloat16,
        device_map={"": "cpu" if args.cpu else 0},
        attn_implementation="sdpa",
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.checkpointing)
    # The pipeline's LoRA recipe (the same constants), so that the comparison stays like for like.
    lora = LoraConfig(
        r=config.LORA_R,
        lora_alpha=config.LORA_ALPHA,
        lora_dropout=config.LORA_DROPOUT,
        bias="none",
        task_type="CAUSAL_LM",
        target_modules=list(config.LORA_TARGETS),
    )
    return get_peft_model(model, lora)


def packed_rows(args: argparse.Namespace):
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    rows = args.batch * args.accumulation * (args.steps + 1)
    ids = torch.randint(0, args.vocab_rows, (rows, args.length), generator=generator)
    return Dataset.from_dict({"input_ids": ids.tolist()})


def word_tokenizer(vocab_rows: int):
    """A tokenizer object for SFTTrainer's bookkeeping (pad/eos ids); the rows are already ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_rows)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="t0", eos_token="t1", unk_token="t0")


def step_timer():
    """A TrainerCallback that records each optimizer step's whole cycle (GPU synchronised): the time
    from the previous step's end to this one's."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.durations: list[float] = []
            self.last = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.durations.append(now - self.last)
            self.last = now

    return StepTimer()


def median_window_seconds(durations: list[float], warmup: int, window: int) -> float:
    """The median over windows of `window` consecutive steps after the first `warmup` of the mean
    step time in each window."""
    kept = durations[warmup:] or durations
    windows = [sum(kept[i : i + window]) / window for i in range(0, len(kept) - window + 1, window)]
    return statistics.median(windows or [sum(kept) / len(kept)])


def main() -> int:
    args = parse_args()
    import torch
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as scratch:
        model = build_model(args, Path(scratch) / "base")
        training = SFTConfig(
            output_dir=str(Path(scratch) / "out"),
            per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=args.accumulation,
            max_steps=args.steps,
            learning_rate=2e-4,
            lr_scheduler_type="constant",
            bf16=not args.cpu,
            use_cpu=args.cpu,
            gradient_checkpointing=args.checkpointing,
            max_length=args.length,
            packing=False,
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to="none",
            dataloader_drop_last=True,
            disable_tqdm=True,
            use_liger_kernel=args.liger,
        )
        timer = step_timer()
        trainer = SFTTrainer(
            model=model,
            args=training,
            train_dataset=packed_rows(args),
            processing_class=word_tokenizer(args.vocab_rows),
            callbacks=[timer],
        )
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    tokens_per_step = args.batch * args.accumulation * args.length
    median_seconds = median_window_seconds(timer.durations, args.warmup, args.logging_steps)
    result = {
        "card": "CPU" if args.cpu else torch.cuda.get_device_name(),
        "mode": ("NF4+LoRA (stock)" if args.quant else "bf16 (stock)") + (" + Liger" if args.liger else ""),
        "batch": args.batch,
        "length": args.length,
        "accumulation": args.accumulation,
        "checkpointing": args.checkpointing,
        "steps": len(timer.durations),
        "tokens_per_second": tokens_per_step / median_seconds,
        "peak_memory_gib": 0.0 if args.cpu else torch.cuda.max_memory_allocated() / 2**30,
    }
    print(
        f"stock TRL {result['mode']}: {result['card']}, {args.batch}x{args.length} GA {args.accumulation}"
        f"{', ckpt' if args.checkpointing else ''}: {result['tokens_per_second']:,.0f} tok/s, "
        f"peak {result['peak_memory_gib']:.2f} GiB"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
