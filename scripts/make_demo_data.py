"""Generate the embedded demo data set ``src/lorafit/assets/demo_alpaca.json``.

Run from the repository root::

    python scripts/make_demo_data.py

The output is a JSON list of 240 alpaca-format records (``instruction``, ``input``, ``output``)
from 8 task families of 30 rows each, shuffled together. Every answer is short, canonical and
checkable by exact match, so a small instruct model fine-tuned on part of the set should visibly
improve on the held-out rows by learning the terse answer format and the simple patterns.
About 40% of the rows carry a non-empty ``input``.

The script uses only the standard library and a fixed seed: running it twice writes a
byte-identical file.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SEED = 20240611
PER_FAMILY = 30
DEFAULT_OUT = (
    Path(__file__).resolve().parents[1] / "src" / "lorafit" / "assets" / "demo_alpaca.json"
)

Record = dict[str, str]


def _rec(instruction: str, input_: str, output: str) -> Record:
    return {"instruction": instruction, "input": input_, "output": output}


# --------------------------------------------------------------------------------------------
# 1. Sentiment of a short review (all rows have input; balanced classes).
# --------------------------------------------------------------------------------------------

SENTIMENT_INSTRUCTION = "Classify the sentiment of this review as positive or negative."

# fmt: off
PRODUCTS = [
    "headset", "blender", "backpack", "coffee maker", "desk lamp", "phone case", "keyboard",
    "water bottle", "vacuum cleaner", "bike helmet", "toaster", "office chair", "umbrella",
    "tent", "smartwatch", "frying pan",
]
# fmt: on
MOVIES = ["movie", "film", "documentary", "thriller", "comedy", "animated film"]

POS_ADJ = ["excellent", "wonderful", "fantastic", "great", "superb", "amazing", "brilliant"]
NEG_ADJ = ["terrible", "awful", "disappointing", "horrible", "useless", "dreadful", "poor"]

POS_PRODUCT_CLAUSES = [
    "I would happily buy it again",
    "it works perfectly every day",
    "it was worth every penny",
    "I recommend it to everyone",
    "the quality is outstanding",
]
NEG_PRODUCT_CLAUSES = [
    "it broke after one week",
    "I want my money back",
    "it stopped working on the first day",
    "I would never buy it again",
    "the quality is very poor",
]
POS_MOVIE_CLAUSES = [
    "I loved every minute of it",
    "the acting was superb",
    "I would gladly watch it again",
    "the story kept me smiling",
    "it is the best I have seen this year",
]
NEG_MOVIE_CLAUSES = [
    "I was bored the whole time",
    "the acting was painful to watch",
    "I walked out halfway through",
    "the story made no sense",
    "it was a complete waste of time",
]

REVIEW_TEMPLATES = [
    "The {item} is {adj} and {clause}.",
    "This {item} was {adj}. {Clause}.",
    "What {a} {adj} {item}! {Clause}.",
    "{Adj} {item}, {clause}.",
]


def _article(word: str) -> str:
    return "an" if word[0] in "aeio" else "a"  # no adjective here starts with a vowel "u"


def _review(rng: random.Random, positive: bool) -> str:
    if rng.random() < 0.6:
        item = rng.choice(PRODUCTS)
        clauses = POS_PRODUCT_CLAUSES if positive else NEG_PRODUCT_CLAUSES
    else:
        item = rng.choice(MOVIES)
        clauses = POS_MOVIE_CLAUSES if positive else NEG_MOVIE_CLAUSES
    adj = rng.choice(POS_ADJ if positive else NEG_ADJ)
    clause = rng.choice(clauses)
    template = rng.choice(REVIEW_TEMPLATES)
    return template.format(
        item=item,
        adj=adj,
        Adj=adj.capitalize(),
        a=_article(adj),
        clause=clause,
        Clause=clause[0].upper() + clause[1:],
    )


def sentiment(rng: random.Random) -> list[Record]:
    rows: list[Record] = []
    seen: set[str] = set()
    labels = ["positive", "negative"] * (PER_FAMILY // 2)
    for label in labels:
        while True:
            review = _review(rng, label == "positive")
            if review not in seen:
                seen.add(review)
                break
        rows.append(_rec(SENTIMENT_INSTRUCTION, review, label))
    return rows


# --------------------------------------------------------------------------------------------
# 2. Addition of two 1-2 digit numbers (no input).
# --------------------------------------------------------------------------------------------

ADDITION_PHRASINGS = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}."]


def addition(rng: random.Random) -> list[Record]:
    rows: list[Record] = []
    seen: set[tuple[int, int]] = set()
    while len(rows) < PER_FAMILY:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        rows.append(_rec(rng.choice(ADDITION_PHRASINGS).format(a=a, b=b), "", str(a + b)))
    return rows


# --------------------------------------------------------------------------------------------
# 3. Capital of a well-known country (no input). Only countries with one undisputed capital
#    whose usual English spelling is plain ASCII.
# --------------------------------------------------------------------------------------------

# fmt: off
CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("the United Kingdom", "London"), ("Ireland", "Dublin"),
    ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Poland", "Warsaw"), ("Austria", "Vienna"),
    ("Hungary", "Budapest"), ("Russia", "Moscow"), ("Japan", "Tokyo"), ("China", "Beijing"),
    ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("India", "New Delhi"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Australia", "Canberra"),
    ("Cuba", "Havana"), ("the Czech Republic", "Prague"),
]
# fmt: on
CAPITAL_PHRASINGS = [
    "What is the capital of {c}?",
    "Name the capital city of {c}.",
    "Which city is the capital of {c}?",
]


def capitals(rng: random.Random) -> list[Record]:
    pairs = rng.sample(CAPITALS, PER_FAMILY)
    return [_rec(rng.choice(CAPITAL_PHRASINGS).format(c=c), "", cap) for c, cap in pairs]


# --------------------------------------------------------------------------------------------
# 4. Convert a word to uppercase (18 rows with the word as input, 12 with it inline).
# --------------------------------------------------------------------------------------------

# fmt: off
UPPER_WORDS = [
    "apple", "garden", "river", "window", "pencil", "orange", "planet", "silver", "bridge",
    "candle", "forest", "guitar", "harbor", "island", "jacket", "kitten", "ladder", "marble",
    "needle", "ocean", "pepper", "rabbit", "saddle", "tunnel", "violin", "wallet", "yellow",
    "zebra", "button", "cloud", "dragon", "engine", "feather", "helmet", "lemon", "mirror",
]
# fmt: on
UPPER_INPUT_PHRASINGS = [
    "Convert the following word to uppercase.",
    "Rewrite this word in capital letters.",
]
UPPER_INLINE_PHRASINGS = [
    'Write the word "{w}" in uppercase.',
    'Convert "{w}" to capital letters.',
]
UPPER_WITH_INPUT = 18


def uppercase(rng: random.Random) -> list[Record]:
    words = rng.sample(UPPER_WORDS, PER_FAMILY)
    rows: list[Record] = []
    for i, w in enumerate(words):
        if i < UPPER_WITH_INPUT:
            rows.append(_rec(rng.choice(UPPER_INPUT_PHRASINGS), w, w.upper()))
        else:
            rows.append(_rec(rng.choice(UPPER_INLINE_PHRASINGS).format(w=w), "", w.upper()))
    return rows


# --------------------------------------------------------------------------------------------
# 5. Plural of a common English noun (no input). Only nouns with one standard plural.
# --------------------------------------------------------------------------------------------

# fmt: off
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("tooth", "teeth"), ("foot", "feet"), ("goose", "geese"), ("person", "people"),
    ("sheep", "sheep"), ("deer", "deer"), ("leaf", "leaves"), ("knife", "knives"),
    ("wolf", "wolves"), ("wife", "wives"), ("shelf", "shelves"), ("half", "halves"),
    ("box", "boxes"), ("church", "churches"), ("dish", "dishes"), ("glass", "glasses"),
    ("city", "cities"), ("baby", "babies"), ("story", "stories"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("dog", "dogs"), ("book", "books"),
    ("key", "keys"), ("toy", "toys"), ("house", "houses"), ("watch", "watches"),
]
# fmt: on
PLURAL_PHRASINGS = [
    "What is the plural of {w}?",
    'Give the plural form of the noun "{w}".',
    "Write the plural of the word {w}.",
]


def plurals(rng: random.Random) -> list[Record]:
    pairs = rng.sample(PLURALS, PER_FAMILY)
    return [_rec(rng.choice(PLURAL_PHRASINGS).format(w=w), "", p) for w, p in pairs]


# --------------------------------------------------------------------------------------------
# 6. Antonym of a common adjective (no input). Only words whose opposite is clear-cut.
# --------------------------------------------------------------------------------------------

# fmt: off
ANTONYMS = [
    ("hot", "cold"), ("cold", "hot"), ("fast", "slow"), ("slow", "fast"), ("wet", "dry"),
    ("dry", "wet"), ("early", "late"), ("late", "early"), ("full", "empty"), ("empty", "full"),
    ("rich", "poor"), ("poor", "rich"), ("young", "old"), ("true", "false"), ("false", "true"),
    ("clean", "dirty"), ("dirty", "clean"), ("strong", "weak"), ("weak", "strong"),
    ("wide", "narrow"), ("narrow", "wide"), ("deep", "shallow"), ("shallow", "deep"),
    ("high", "low"), ("low", "high"), ("happy", "sad"), ("good", "bad"), ("bad", "good"),
    ("alive", "dead"), ("dead", "alive"), ("cheap", "expensive"), ("expensive", "cheap"),
    ("heavy", "light"), ("possible", "impossible"), ("visible", "invisible"),
    ("legal", "illegal"), ("honest", "dishonest"),
]
# fmt: on
ANTONYM_PHRASINGS = [
    "What is the opposite of {w}?",
    'Give the antonym of the adjective "{w}".',
    "What is the antonym of {w}?",
]


def antonyms(rng: random.Random) -> list[Record]:
    pairs = rng.sample(ANTONYMS, PER_FAMILY)
    return [_rec(rng.choice(ANTONYM_PHRASINGS).format(w=w), "", a) for w, a in pairs]


# --------------------------------------------------------------------------------------------
# 7. Next number of an arithmetic sequence (18 rows with the sequence as input, 12 inline).
# --------------------------------------------------------------------------------------------

SEQ_INPUT_PHRASINGS = [
    "What number comes next in this sequence?",
    "Continue the sequence with the next number.",
]
SEQ_INLINE_PHRASINGS = [
    "What number comes next: {s}, ...?",
    "Give the next number in the sequence {s}.",
]
SEQ_WITH_INPUT = 18


def _sequence(rng: random.Random) -> tuple[list[int], int]:
    length = rng.choice([4, 4, 5])
    step = rng.randint(1, 12)
    if rng.random() < 0.2:  # a few decreasing sequences that stay positive
        start = rng.randint(step * length + 1, step * length + 40)
        step = -step
    else:
        start = rng.randint(0, 30)
    terms = [start + i * step for i in range(length + 1)]
    return terms[:-1], terms[-1]


def sequences(rng: random.Random) -> list[Record]:
    rows: list[Record] = []
    seen: set[str] = set()
    while len(rows) < PER_FAMILY:
        terms, nxt = _sequence(rng)
        shown = ", ".join(str(t) for t in terms)
        if shown in seen:
            continue
        seen.add(shown)
        if len(rows) < SEQ_WITH_INPUT:
            rows.append(_rec(rng.choice(SEQ_INPUT_PHRASINGS), shown, str(nxt)))
        else:
            instruction = rng.choice(SEQ_INLINE_PHRASINGS).format(s=shown)
            rows.append(_rec(instruction, "", str(nxt)))
    return rows


# --------------------------------------------------------------------------------------------
# 8. Count the words in a short sentence (all rows have input). Plain words only: no digits,
#    hyphens or contractions, so the count is simply the number of space-separated tokens.
# --------------------------------------------------------------------------------------------

COUNT_PHRASINGS = [
    "How many words are in the following sentence?",
    "Count the words in this sentence.",
    "How many words does this sentence contain?",
]
SUBJECTS = ["cat", "dog", "teacher", "farmer", "child", "bird", "baker", "pilot", "girl", "boy"]
SUBJECT_ADJ = ["little", "old", "happy", "tired", "young", "clever", "quiet"]
# fmt: off
VERB_PHRASES = [
    "sleeps", "runs", "sings", "reads a book", "eats an apple", "drinks warm milk",
    "plays in the park", "walks to the station", "writes a long letter", "waits for the bus",
    "paints the fence", "opens the door",
]
TAILS = ["", "", "every morning", "after lunch", "in the rain", "on Sunday", "with a friend",
         "before dinner", "near the old bridge"]
# fmt: on


def _sentence(rng: random.Random) -> str:
    words = ["the"]
    if rng.random() < 0.5:
        words.append(rng.choice(SUBJECT_ADJ))
    words.append(rng.choice(SUBJECTS))
    words.append(rng.choice(VERB_PHRASES))
    tail = rng.choice(TAILS)
    if tail:
        words.append(tail)
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def word_counts(rng: random.Random) -> list[Record]:
    rows: list[Record] = []
    seen: set[str] = set()
    while len(rows) < PER_FAMILY:
        sentence = _sentence(rng)
        if sentence in seen:
            continue
        seen.add(sentence)
        rows.append(_rec(rng.choice(COUNT_PHRASINGS), sentence, str(len(sentence.split()))))
    return rows


# --------------------------------------------------------------------------------------------

FAMILIES = [sentiment, addition, capitals, uppercase, plurals, antonyms, sequences, word_counts]


def build(seed: int = SEED) -> list[Record]:
    rng = random.Random(seed)
    rows: list[Record] = []
    for family in FAMILIES:
        rows.extend(family(rng))
    keys = [(r["instruction"], r["input"]) for r in rows]
    if len(set(keys)) != len(keys):
        raise RuntimeError("duplicate (instruction, input) pairs")
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output JSON path")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed")
    args = parser.parse_args()
    rows = build(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with_input = sum(1 for r in rows if r["input"])
    print(f"wrote {len(rows)} rows ({with_input} with input) to {args.out}")


if __name__ == "__main__":
    main()
