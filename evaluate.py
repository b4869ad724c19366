"""Exact-match accuracy of a model on the held-out instruction prompts, overall and per task.

`python3 evaluate.py MODEL_DIR [--heldout PATH] [--limit N]`. MODEL_DIR is a model folder with its
tokenizer (a published model, WORK_DIR/trained/model), or a folder with `model/` and `tokenizer/`
inside (WORK_DIR/prep). Each prompt is asked as `<|user|>PROMPT<|end|><|bot|>`, through the chat template
when the tokenizer has one, else as plain text after <s> so that a pretraining-only model can be scored
too. Generation is greedy and batched with left padding; the answer is the generated text up to
<|end|> or </s>, stripped, compared exactly with the expected one.

`eval_split_samples` answers a few conversations of prep.py's held-out split the same way, for the
model card of an instruction model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import config
import util

MAX_NEW_TOKENS = 24
BATCH_SIZE = 64
END_MARKER = "<|end|>"


def model_and_tokenizer_dirs(model_dir: Path) -> tuple[Path, Path]:
    if (model_dir / "model").is_dir() and (model_dir / "tokenizer").is_dir():
        return model_dir / "model", model_dir / "tokenizer"
    return model_dir, model_dir


def load_heldout(path: Path, limit: int | None) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not all(isinstance(row.get(key), str) for key in ("task", "prompt", "answer")):
                raise ValueError(f"{path} line {number}: needs string fields task, prompt and answer")
            rows.append(row)
    return rows[:limit] if limit is not None else rows


def prompt_text(tokenizer, prompt: str) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return f"{tokenizer.bos_token or ''}<|user|>{prompt}{END_MARKER}<|bot|>"


def answer_from(generated: str, tokenizer) -> str:
    """The generated text up to <|end|> or </s>, without padding, stripped."""
    for stop in (END_MARKER, tokenizer.eos_token):
        if stop:
            generated = generated.split(stop)[0]
    if tokenizer.pad_token:
        generated = generated.replace(tokenizer.pad_token, "")
    return generated.strip()


def stop_token_ids(tokenizer) -> list[int]:
    """</s>, and <|end|> where the tokenizer has it: where an answer ends."""
    stop_ids = [tokenizer.eos_token_id]
    if END_MARKER in tokenizer.get_vocab():
        stop_ids.append(tokenizer.convert_tokens_to_ids(END_MARKER))
    return stop_ids


def generate_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy answers for `prompts`, batched with left padding (longest prompts first, less padding)."""
    import torch

    stop_ids = stop_token_ids(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    for start in range(0, len(order), BATCH_SIZE):
        batch = order[start : start + BATCH_SIZE]
        texts = [prompt_text(tokenizer, prompts[i]) for i in batch]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            output = model.generate(
                **inputs,
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=stop_ids,
                pad_token_id=tokenizer.pad_token_id,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        for i, tokens in zip(batch, new_tokens):
            answers[i] = answer_from(tokenizer.decode(tokens, skip_special_tokens=False), tokenizer)
    return answers


def first_answer_span(mask: list[int]) -> tuple[int, int]:
    """Where a conversation's first answer starts and ends, by its assistant mask (its <|end|> included)."""
    start = mask.index(1)
    end = next((i for i in range(start, len(mask)) if not mask[i]), len(mask))
    return start, end


def eval_split_samples(model_dir: Path, eval_split: Path, count: int) -> list[dict[str, str]]:
    """The first `count` conversations of prep.py's eval split (WORK_DIR/prep/eval_dataset), each as
    its prompt (the conversation up to its first answer, as the model reads it), the answer in the
    data and the model's greedy answer (at most MAX_NEW_TOKENS tokens)."""
    import datasets
    import torch

    model, tokenizer = load_model_and_tokenizer(Path(model_dir))
    rows = datasets.load_from_disk(str(eval_split))
    samples = []
    for row in rows.select(range(min(count, len(rows)))):
        start, end = first_answer_span(row["assistant_masks"])
        prompt = row["input_ids"][:start]
        with torch.no_grad():
            output = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=stop_token_ids(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
            )
        shown = tokenizer.decode(prompt, skip_special_tokens=False).removeprefix(tokenizer.bos_token or "")
        samples.append(
            {
                "prompt": shown,
                "expected": answer_from(tokenizer.decode(row["input_ids"][start:end]), tokenizer),
                "answer": answer_from(tokenizer.decode(output[0, start:]), tokenizer),
            }
        )
    return samples


def load_model_and_tokenizer(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights_dir, tokenizer_dir = model_and_tokenizer_dirs(Path(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(weights_dir, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def evaluate_heldout(
    model_dir: Path, heldout_path: Path = config.DEMO_HELDOUT, limit: int | None = None
) -> dict[str, Any]:
    """{"accuracy", "per_task": {task: accuracy}, "results": [{task, prompt, answer, predicted, correct}]}."""
    model, tokenizer = load_model_and_tokenizer(Path(model_dir))
    rows = load_heldout(Path(heldout_path), limit)
    predicted = generate_answers(model, tokenizer, [row["prompt"] for row in rows])
    results = [{**row, "predicted": guess, "correct": guess == row["answer"]} for row, guess in zip(rows, predicted)]
    by_task: dict[str, list[bool]] = defaultdict(list)
    for result in results:
        by_task[result["task"]].append(result["correct"])
    return {
        "accuracy": sum(r["correct"] for r in results) / max(len(results), 1),
        "per_task": {task: sum(marks) / len(marks) for task, marks in sorted(by_task.items())},
        "results": results,
    }


def heldout_accuracy(model_dir: Path, heldout_path: Path = config.DEMO_HELDOUT, limit: int | None = None) -> float:
    return evaluate_heldout(model_dir, heldout_path, limit)["accuracy"]


def report(evaluation: dict[str, Any], seconds: float) -> None:
    results = evaluation["results"]
    for task, accuracy in evaluation["per_task"].items():
        util.log(f"  {task:<12} {accuracy:6.1%}  ({sum(1 for r in results if r['task'] == task)} prompts)")
    for wrong in [r for r in results if not r["correct"]][:5]:
        util.log(f"  wrong: {wrong['prompt']!r} -> {wrong['predicted']!r} (expected {wrong['answer']!r})")
    util.log(f"held-out accuracy: {evaluation['accuracy']:.1%} of {len(results)} prompts in {seconds:.1f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description="Exact-match accuracy on held-out instruction prompts.")
    parser.add_argument("model_dir", type=Path, help="model folder with its tokenizer, or a prep folder")
    parser.add_argument("--heldout", type=Path, default=config.DEMO_HELDOUT, help="JSON lines of task, prompt, answer")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N prompts")
    args = parser.parse_args()
    weights_dir, _ = model_and_tokenizer_dirs(args.model_dir)
    for path, what in ((weights_dir / "config.json", "a model folder"), (args.heldout, "a held-out file")):
        if not path.is_file():
            print(f"evaluate: {path} does not exist; pass {what}", file=sys.stderr)
            return config.ExitCode.FAILED
    started = time.monotonic()
    evaluation = evaluate_heldout(args.model_dir, args.heldout, args.limit)
    report(evaluation, time.monotonic() - started)
    return config.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
