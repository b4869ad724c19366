"""Writes the embedded demo corpora: pretrain.jsonl, instruct.jsonl and instruct_heldout.jsonl.

`python3 data/generate.py [--out FOLDER]` rewrites the three files byte-identically (a seeded
`random.Random`, no set iteration, fixed JSON formatting), using the standard library only.

The instruction tasks have short, exactly checkable answers and fixed phrasings, simple enough for a
~3M-parameter model: copying, first word, capitals, the larger of two numbers, adding two digits, the
number after N, counting list items, sorting digits, and (harder) reversing a short word. The
pretraining documents are little stories and facts built from the same words and numbers (counting
runs, sums, comparisons, capitals, words backwards) and, in 40% of them, two invented people asking
each other the same kinds of questions in prose, so that the tokenizer and the model meet the
instruction vocabulary and tasks before instruction tuning. Held-out prompts are drawn first and
excluded from the instruction data and the pretraining questions, so none of them is ever trained on.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
SEED = 20240607
PRETRAIN_BYTES = 1_500_000
INSTRUCT_ROWS = 5000
HELDOUT_ROWS = 200
MULTI_TURN_SHARE = 0.15
QUIZ_SHARE = 0.4  # share of pretraining documents that are question games
FILE_NAMES = ("pretrain.jsonl", "instruct.jsonl", "instruct_heldout.jsonl")

NAMES = (
    "Tomas",
    "Lina",
    "Bodo",
    "Mira",
    "Keld",
    "Suri",
    "Ando",
    "Pela",
    "Rune",
    "Vesa",
    "Nilo",
    "Oda",
    "Fenn",
    "Ilsa",
    "Joro",
    "Tavi",
    "Wren",
    "Yara",
    "Zeno",
    "Cato",
    "Edda",
    "Hugo",
    "Lumi",
    "Rafi",
)
ANIMALS = (
    "cat",
    "dog",
    "fox",
    "owl",
    "hen",
    "cow",
    "pig",
    "bat",
    "bee",
    "ant",
    "elk",
    "yak",
    "rat",
    "emu",
    "ram",
    "frog",
    "goat",
    "duck",
    "bear",
    "wolf",
    "deer",
    "fish",
    "mole",
    "seal",
    "crab",
    "lion",
    "hare",
    "swan",
    "toad",
    "mouse",
    "horse",
    "sheep",
    "tiger",
    "snail",
    "otter",
)
COLOURS = (
    "red",
    "blue",
    "green",
    "pink",
    "gray",
    "gold",
    "black",
    "white",
    "brown",
    "teal",
    "tan",
    "purple",
    "yellow",
    "silver",
)
THINGS = (
    "apple",
    "pear",
    "plum",
    "fig",
    "kiwi",
    "lemon",
    "melon",
    "grape",
    "peach",
    "cherry",
    "mango",
    "cup",
    "hat",
    "box",
    "pen",
    "key",
    "map",
    "bell",
    "book",
    "coin",
    "lamp",
    "ring",
    "sock",
    "spoon",
    "kite",
    "drum",
    "boat",
    "shoe",
    "bowl",
    "star",
)
SIZES = ("big", "small", "tall", "tiny", "old", "young", "fast", "slow", "happy", "quiet")
PLACES = (
    "the farm",
    "the park",
    "the lake",
    "the hill",
    "the market",
    "the garden",
    "the river",
    "the forest",
    "the village",
    "the beach",
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Short words for the reverse task: every animal, thing and colour of three or four letters.
SHORT_WORDS = tuple(w for w in ANIMALS + THINGS + COLOURS if 3 <= len(w) <= 4)
NOUNS = ANIMALS + THINGS


def phrase(rng: random.Random, min_words: int, max_words: int) -> str:
    """A small noun phrase or word list: 'red fox', 'tiny blue cup', 'Mira', 'owl hat bell'."""
    count = rng.randint(min_words, max_words)
    pools = (SIZES, COLOURS, NOUNS) if count == 3 and rng.random() < 0.5 else None
    if pools:
        return " ".join(rng.choice(pool) for pool in pools)
    if count == 2 and rng.random() < 0.6:
        return f"{rng.choice(COLOURS)} {rng.choice(NOUNS)}"
    if count == 1 and rng.random() < 0.3:
        return rng.choice(NAMES)
    return " ".join(rng.choice(NOUNS + COLOURS) for _ in range(count))


def plural(noun: str) -> str:
    if noun in ("sheep", "fish", "deer"):
        return noun
    if noun == "mouse":
        return "mice"
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def with_article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def digits_text(numbers: list[int]) -> str:
    return " ".join(str(n) for n in numbers)


# ---- instruction tasks: each returns (prompt, answer) ----


def task_repeat(rng: random.Random) -> tuple[str, str]:
    text = phrase(rng, 1, 2)
    return f"Repeat: {text}", text


def task_first_word(rng: random.Random) -> tuple[str, str]:
    text = phrase(rng, 2, 4)
    return f"First word: {text}", text.split()[0]


def task_capitals(rng: random.Random) -> tuple[str, str]:
    text = " ".join(rng.choice(NOUNS + COLOURS) for _ in range(rng.randint(1, 2)))
    return f"Capitals: {text}", text.upper()


def task_larger(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(range(10), 2)
    return f"Which is larger: {a} or {b}?", str(max(a, b))


def task_add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return f"Add: {a} + {b}", str(a + b)


def task_next(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, 98)
    return f"What comes after {n}?", str(n + 1)


def task_count(rng: random.Random) -> tuple[str, str]:
    items = [rng.choice(NOUNS) for _ in range(rng.randint(1, 7))]
    return f"How many items: {', '.join(items)}", str(len(items))


def task_sort(rng: random.Random) -> tuple[str, str]:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return f"Sort: {digits_text(numbers)}", digits_text(sorted(numbers))


def task_reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(SHORT_WORDS)
    return f"Reverse: {word}", word[::-1]


# name -> (make, training weight); held-out rows are spread evenly over the tasks.
TASKS: dict[str, tuple[Callable[[random.Random], tuple[str, str]], float]] = {
    "repeat": (task_repeat, 1.2),
    "first_word": (task_first_word, 1.0),
    "capitals": (task_capitals, 1.0),
    "larger": (task_larger, 1.0),
    "add": (task_add, 1.2),
    "next": (task_next, 0.8),
    "count": (task_count, 1.0),
    "sort": (task_sort, 1.2),
    "reverse": (task_reverse, 0.6),
}


def follow_up(task: str, answer: str) -> tuple[str, str]:
    """A second turn that refers to the first answer."""
    if task in ("add", "larger", "next", "count"):
        return "Add one.", str(int(answer) + 1)
    if task == "sort":
        return "Now largest first.", digits_text(sorted((int(n) for n in answer.split()), reverse=True))
    if task == "capitals":
        return "Now in small letters.", answer.lower()
    return "Now in capitals.", answer.upper()


def conversation_text(turns: list[tuple[str, str]]) -> str:
    return "".join(f"<|user|>{prompt}<|end|><|bot|>{answer}<|end|>" for prompt, answer in turns)


def heldout_rows(rng: random.Random) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    names = list(TASKS)
    while len(rows) < HELDOUT_ROWS:
        task = names[len(rows) % len(names)]
        prompt, answer = TASKS[task][0](rng)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"task": task, "prompt": prompt, "answer": answer})
    return rows


def instruct_rows(rng: random.Random, excluded_prompts: set[str]) -> list[dict[str, str]]:
    names = list(TASKS)
    weights = [TASKS[name][1] for name in names]
    rows: list[dict[str, str]] = []
    while len(rows) < INSTRUCT_ROWS:
        task = rng.choices(names, weights)[0]
        prompt, answer = TASKS[task][0](rng)
        if prompt in excluded_prompts:
            continue
        turns = [(prompt, answer)]
        if rng.random() < MULTI_TURN_SHARE:
            turns.append(follow_up(task, answer))
        rows.append({"text": conversation_text(turns)})
    return rows


# ---- pretraining documents: each sentence maker returns one or more sentences about `name` ----


def say_pet(rng: random.Random, name: str) -> str:
    size, colour, animal, thing = rng.choice(SIZES), rng.choice(COLOURS), rng.choice(ANIMALS), rng.choice(THINGS)
    return (
        f"{name} has {with_article(size)} {colour} {animal}. The {animal} likes the {thing} and sleeps near "
        f"{rng.choice(PLACES)}."
    )


def say_counting(rng: random.Random, name: str) -> str:
    start = rng.randint(0, 90)
    numbers = list(range(start, start + rng.randint(4, 10)))
    last = numbers[-1]
    return (
        f"{name} counted: {', '.join(map(str, numbers))}. After {last - 1} comes {last}, and the "
        f"number after {last} is {last + 1}."
    )


def say_comparison(rng: random.Random, name: str) -> str:
    a, b = rng.sample(range(21), 2)
    friend = rng.choice(NAMES)
    thing = rng.choice(THINGS)
    more = name if a > b else friend
    return (
        f"{name} has {a} {plural(thing)} and {friend} has {b}. {max(a, b)} is larger than {min(a, b)}, "
        f"so {more} has more."
    )


def say_sum(rng: random.Random, name: str) -> str:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    thing = rng.choice(THINGS)
    return f"{name} found {a} {plural(thing)} and then {b} more. {a} + {b} = {a + b}, so now there are {a + b}."


def say_sorting(rng: random.Random, name: str) -> str:
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    return (
        f"{name} wrote the numbers {digits_text(numbers)} and put them in order: "
        f"{digits_text(sorted(numbers))}. The largest first: {digits_text(sorted(numbers, reverse=True))}."
    )


def say_list(rng: random.Random, name: str) -> str:
    items = [rng.choice(NOUNS) for _ in range(rng.randint(1, 7))]
    count = len(items)
    word = NUMBER_WORDS[count]
    return f"In the bag of {name} there are: {', '.join(items)}. That is {count} items, {word} in all."


def say_capitals(rng: random.Random, name: str) -> str:
    word = rng.choice(NOUNS + COLOURS)
    other = rng.choice(NOUNS + COLOURS)
    return (
        f"{name} painted {word.upper()} on a sign in big letters. In capitals {word} is "
        f"{word.upper()} and {other} is {other.upper()}; in small letters {other.upper()} is {other}."
    )


def say_backwards(rng: random.Random, name: str) -> str:
    word = rng.choice(SHORT_WORDS)
    return f"{name} likes to spell words backwards. The word {word} backwards is {word[::-1]}."


def say_first_word(rng: random.Random, name: str) -> str:
    text = phrase(rng, 2, 4)
    return f"{name} said: {text}. The first word was {text.split()[0]}, and {name} said it again: {text}."


def say_fact(rng: random.Random, name: str) -> str:
    animal, colour, n = rng.choice(ANIMALS), rng.choice(COLOURS), rng.randint(2, 9)
    place = rng.choice(PLACES)
    return (
        f"{with_article(animal).capitalize()} is an animal. {name} saw {n} {colour} {plural(animal)} "
        f"at {place}, {NUMBER_WORDS[n]} of them."
    )


SENTENCES = (
    say_pet,
    say_counting,
    say_comparison,
    say_sum,
    say_sorting,
    say_list,
    say_capitals,
    say_backwards,
    say_first_word,
    say_fact,
)


def quiz_document(rng: random.Random, excluded_prompts: set[str]) -> str:
    """Two invented people asking each other the instruction tasks in plain prose, so pretraining
    already shows each task's question and answer (never a held-out question)."""
    asker, answerer = rng.sample(NAMES, 2)
    sentences = [f"{asker} and {answerer} played a question game at {rng.choice(PLACES)}."]
    names = list(TASKS)
    questions = rng.randint(3, 7)
    while len(sentences) <= questions:
        task = rng.choice(names)
        prompt, answer = TASKS[task][0](rng)
        if prompt in excluded_prompts:
            continue
        ending = "" if prompt.endswith("?") else "."
        sentences.append(f"{asker} asked: {prompt}{ending} {answerer} said: {answer}.")
        if rng.random() < MULTI_TURN_SHARE:
            again, second = follow_up(task, answer)
            sentences.append(f"{asker} asked: {again} {answerer} said: {second}.")
    return " ".join(sentences)


def story_document(rng: random.Random) -> str:
    name = rng.choice(NAMES)
    sentences = [f"This is a story about {name}."]
    sentences += [rng.choice(SENTENCES)(rng, name) for _ in range(rng.randint(3, 7))]
    return " ".join(sentences)


def pretrain_rows(rng: random.Random, excluded_prompts: set[str]) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    size = 0
    while size < PRETRAIN_BYTES:
        quiz = rng.random() < QUIZ_SHARE
        row = {"text": quiz_document(rng, excluded_prompts) if quiz else story_document(rng)}
        rows.append(row)
        size += len(json.dumps(row)) + 1
    return rows


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def generate(out_dir: Path = DATA_DIR) -> dict[str, Path]:
    """Write the three corpora into out_dir; the same bytes every time."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    heldout = heldout_rows(rng)
    instruct = instruct_rows(rng, {row["prompt"] for row in heldout})
    pretrain = pretrain_rows(rng, {row["prompt"] for row in heldout})
    paths = {name: out_dir / name for name in FILE_NAMES}
    write_jsonl(paths["pretrain.jsonl"], pretrain)
    write_jsonl(paths["instruct.jsonl"], instruct)
    write_jsonl(paths["instruct_heldout.jsonl"], heldout)
    return paths


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="folder to write the three files into")
    args = parser.parse_args()
    for path in generate(args.out).values():
        print(f"{path}: {path.stat().st_size:,} bytes, {sum(1 for _ in open(path)):,} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
