"""Write the bundled example task: customer order messages -> one-line JSON.

Every row asks the model to read a short customer message and answer with the
order as JSON in one fixed form::

    {"item": "desk lamp", "quantity": 3, "city": "Lisbon"}

The item is the catalogue name in the singular, the quantity a number (messages
write it as digits, as a word, or as "a"/"an"/"a pair of"/"a dozen"), and the
city as written. The messages, word lists and phrasings are our own, generated
here from a fixed seed, so the output is the same on every run.

The held-out test set is meant to show generalisation, not memorisation: no
test message appears in the training set, and some items and cities of the test
set never occur in training at all (the model has to copy them from the
message rather than recall them).

Run from the repository root::

    python examples/make_example_data.py          # writes examples/data/{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

INSTRUCTION = (
    "Extract the order from the customer message. Answer with JSON only, in the form "
    '{"item": ..., "quantity": ..., "city": ...}: the item in the singular, the quantity as a number.'
)

# Catalogue items: (singular, plural).
ITEMS = [
    ("desk lamp", "desk lamps"), ("coffee mug", "coffee mugs"), ("backpack", "backpacks"),
    ("notebook", "notebooks"), ("umbrella", "umbrellas"), ("water bottle", "water bottles"),
    ("phone charger", "phone chargers"), ("wool scarf", "wool scarves"), ("teapot", "teapots"),
    ("yoga mat", "yoga mats"), ("bicycle helmet", "bicycle helmets"), ("frying pan", "frying pans"),
    ("pillow", "pillows"), ("candle", "candles"), ("toaster", "toasters"), ("hair dryer", "hair dryers"),
    ("wall clock", "wall clocks"), ("pencil case", "pencil cases"), ("rain jacket", "rain jackets"),
    ("cutting board", "cutting boards"), ("flower pot", "flower pots"), ("bath towel", "bath towels"),
    ("gaming mouse", "gaming mice"), ("sun hat", "sun hats"), ("lunch box", "lunch boxes"),
    ("picture frame", "picture frames"), ("kitchen knife", "kitchen knives"), ("office chair", "office chairs"),
    ("keyboard", "keyboards"), ("travel adapter", "travel adapters"), ("wine glass", "wine glasses"),
    ("sleeping bag", "sleeping bags"), ("tennis racket", "tennis rackets"), ("blender", "blenders"),
    ("door mat", "door mats"), ("bookshelf", "bookshelves"), ("alarm clock", "alarm clocks"),
    ("paint brush", "paint brushes"), ("camping stove", "camping stoves"), ("shoe rack", "shoe racks"),
    ("glass jar", "glass jars"), ("laundry basket", "laundry baskets"), ("tea towel", "tea towels"),
    ("reading light", "reading lights"), ("salad bowl", "salad bowls"), ("hammock", "hammocks"),
]

CITIES = [
    "Lisbon", "Osaka", "Nairobi", "Toronto", "Lyon", "Krakow", "Denver", "Melbourne", "Seville",
    "Porto", "Sapporo", "Auckland", "Glasgow", "Hamburg", "Valencia", "Bergen", "Tallinn", "Quito",
    "Montreal", "Dublin", "Fukuoka", "Busan", "Cape Town", "Vancouver", "Edinburgh", "Bologna",
    "Rotterdam", "Gothenburg", "Antwerp", "Salzburg", "Nagoya", "Perth", "Leeds", "Bilbao",
    "Marseille", "Zurich", "Vilnius", "Ljubljana", "San Diego", "Kyoto", "Brisbane", "Cork",
    "Utrecht", "Aarhus", "Graz", "Split", "Halifax", "Wellington",
]

NUMBER_WORDS = {
    2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
    10: "ten", 11: "eleven", 12: "twelve", 15: "fifteen", 20: "twenty",
}

GREETINGS = ["", "", "", "Hi, ", "Hello, ", "Good morning, ", "Hey there, ", "Hi team, "]
CLOSINGS = ["", "", "", " Thanks!", " Thank you.", " Many thanks.", " Cheers.", " Best regards, Sam."]

# {qty} is the quantity phrase with the noun already attached ("three teapots", "a teapot").
PHRASES = [
    "I would like to order {qty}, delivered to {city}.",
    "please send {qty} to our office in {city}.",
    "could you ship {qty} to {city}?",
    "we need {qty} for the new shop in {city}.",
    "I'd like {qty} sent to my address in {city}.",
    "my order: {qty}, shipping to {city}.",
    "can I get {qty}? I live in {city}.",
    "please deliver {qty} to {city} by Friday.",
    "I'm writing from {city} and want to buy {qty}.",
    "our team in {city} is asking for {qty}.",
    "I'm in {city}. Please put me down for {qty}.",
    "one more order for {city}: {qty}.",
    "ship to {city}, please: {qty}.",
    "is it possible to send {qty} to {city} next week?",
    "I want to order {qty}. The delivery address is in {city}.",
    "for our branch in {city} we would like {qty}.",
]


def quantity_phrase(rng: random.Random, singular: str, plural: str) -> tuple[int, str]:
    """(number, phrase): the phrase names the item, e.g. (3, "three teapots")."""
    kind = rng.random()
    if kind < 0.12:
        article = "an" if singular[0] in "aeiou" else "a"
        return 1, f"{rng.choice([article, 'one'])} {singular}"
    if kind < 0.18:
        return 12, f"a dozen {plural}"
    if kind < 0.22:
        return 2, f"a pair of {plural}"
    n = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 15, 20, 24, 25, 30, 40, 50, 60, 75, 100])
    if n in NUMBER_WORDS and rng.random() < 0.5:
        return n, f"{NUMBER_WORDS[n]} {plural}"
    return n, f"{n} {plural}"


def make_row(rng: random.Random, items, cities) -> dict:
    singular, plural = rng.choice(items)
    city = rng.choice(cities)
    number, qty = quantity_phrase(rng, singular, plural)
    body = rng.choice(PHRASES).format(qty=qty, city=city)
    greeting = rng.choice(GREETINGS)
    message = (greeting + body) if greeting else (body[0].upper() + body[1:])
    message += rng.choice(CLOSINGS)
    output = json.dumps({"item": singular, "quantity": number, "city": city}, ensure_ascii=False)
    return {"instruction": INSTRUCTION, "input": message, "output": output}


def generate(n_train: int, n_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    items, cities = ITEMS[:], CITIES[:]
    rng.shuffle(items)
    rng.shuffle(cities)
    # About a sixth of the items and cities are seen only in the test set. Unseen
    # items have regular plurals ("+s"); irregular ones are all in training.
    regular = [it for it in items if it[1] == it[0] + "s"]
    unseen_items = regular[:8]
    seen_items = [it for it in items if it not in unseen_items]
    unseen_cities, seen_cities = cities[:8], cities[8:]

    train, seen = [], set()
    while len(train) < n_train:
        row = make_row(rng, seen_items, seen_cities)
        if row["input"] not in seen:
            seen.add(row["input"])
            train.append(row)

    test: list[dict] = []
    while len(test) < n_test:
        # Three test rows in four use an unseen item (k = 1), city (k = 2) or both (k = 3).
        k = len(test) % 4
        row = make_row(
            rng,
            unseen_items if k in (1, 3) else seen_items,
            unseen_cities if k in (2, 3) else seen_cities,
        )
        if row["input"] not in seen:
            seen.add(row["input"])
            test.append(row)
    return train, test


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=here / "data", help="output folder (default examples/data)")
    parser.add_argument("--train", type=int, default=400, help="training rows (default 400)")
    parser.add_argument("--test", type=int, default=48, help="held-out rows (default 48)")
    parser.add_argument("--seed", type=int, default=20240611, help="random seed (default fixed)")
    args = parser.parse_args()
    train, test = generate(args.train, args.test, args.seed)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "test.jsonl", test)
    print(f"wrote {len(train)} rows to {args.out / 'train.jsonl'} and {len(test)} rows to {args.out / 'test.jsonl'}")


if __name__ == "__main__":
    main()
