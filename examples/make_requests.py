#!/usr/bin/env python3
"""Write examples/requests.jsonl: a deterministic offline batch in the OpenAI Batch API format.

The batch mixes what BlendServe is about: requests that share long prefixes (four system
prompts, two few-shot prefixes) and requests of very different densities (one-word labels
after a long few-shot prompt are compute-dense; stories and explanations after a short prompt
are memory-dense). Chat and completion requests, all greedy except a few seeded samples.

    python examples/make_requests.py                 # writes examples/requests.jsonl (300 lines)
    python examples/make_requests.py --out FILE --scale 4   # 4x as many requests
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUPPORT = ("You are the support assistant of Velo Works, a bicycle shop in Leeds. You answer customers' "
           "questions about repairs, parts and orders. Be friendly and brief: two or three sentences. If a "
           "question is about safety, tell the customer to bring the bike to the shop. Opening hours: Monday "
           "to Saturday, 9:00 to 19:00. Standard service costs 45 euros and takes two days.")
TUTOR = ("You are a patient geography tutor for secondary-school students. Answer in one short sentence "
         "with the fact asked for, and nothing else.")
TEACHER = ("You are a science teacher who explains ideas clearly to curious teenagers. Use simple words, "
           "give one concrete everyday example, and organise the answer in short paragraphs.")
WRITER = "You are a creative writer. Write vivid, original short stories for children aged eight to ten."

SENTIMENT_SHOTS = [
    ("The battery lasts all day and the screen is gorgeous.", "positive"),
    ("It stopped working after two weeks and support never answered.", "negative"),
    ("Delivery was on time. The box was a bit dented but the product is fine.", "positive"),
    ("Way too loud, I returned it the next day.", "negative"),
    ("Does exactly what it says, nothing more, nothing less.", "positive"),
    ("The instructions were useless and a screw was missing.", "negative"),
    ("My kids love it and it survived being dropped twice.", "positive"),
    ("Overpriced for what you get.", "negative"),
]
REVIEWS = [
    "Comfortable and light, I wear them every day.", "The zipper broke on the first trip.",
    "Great value, I bought a second one for my brother.", "Smells of plastic even after a week.",
    "Setup took five minutes and it just works.", "The colour is nothing like the photos.",
    "Customer service replaced it without any questions.", "It overheats when charging.",
    "Sharp picture and the sound is better than expected.", "Arrived late and the manual was in the wrong language.",
    "Solid build, feels like it will last for years.", "The app keeps crashing on my phone.",
    "Perfect size for a small kitchen.", "Stopped holding a charge after a month.",
    "Quiet, fast and easy to clean.", "Two of the buttons stick.",
    "I use it every morning, no complaints.", "The strap is too short for adults.",
    "Exactly as described, fast shipping.", "Flimsy lid, it cracked when I closed it.",
]
OPENERS = ["Bought it last month.", "It was a gift.", "Second one I own.", "Ordered online.", "Used it daily."]
UNIT_SHOTS = [
    ("3 kilometres in metres", "3000 m"), ("2.5 hours in minutes", "150 min"), ("500 grams in kilograms", "0.5 kg"),
    ("4 litres in millilitres", "4000 ml"), ("90 seconds in minutes", "1.5 min"), ("1.2 metres in centimetres", "120 cm"),
]
UNITS = [("kilometres", "metres"), ("hours", "minutes"), ("kilograms", "grams"), ("litres", "millilitres"),
         ("minutes", "seconds"), ("metres", "centimetres")]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Kenya", "Australia", "Norway", "Egypt", "Mexico", "India",
             "Italy", "Peru", "Vietnam", "Morocco", "Chile", "Ireland", "Poland", "Thailand", "Ghana", "Spain"]
GEO_QUESTIONS = ["What is the capital of {c}?", "Which continent is {c} in?", "What is the official language of {c}?",
                 "What currency is used in {c}?"]
SUPPORT_QUESTIONS = [
    "How much does a standard service cost?", "Are you open on Sunday?", "My brakes squeak when it rains, is that normal?",
    "Can you order a 28-inch inner tube for me?", "How long does a service take?",
    "My chain keeps falling off, what should I do?", "Do you sell helmets for children?",
    "Can I pay for the repair by card?", "The front wheel wobbles at high speed.", "Do you repair electric bikes?",
]
SCIENCE = ["why the sky is blue", "how vaccines train the immune system", "why ice floats on water",
           "how a rainbow forms", "what causes the seasons", "how plants make food from sunlight",
           "why metals feel colder than wood", "how sound travels through air", "what makes a magnet attract iron",
           "how a refrigerator keeps food cold", "why we see phases of the Moon", "how bees make honey",
           "what electricity is", "why bread dough rises", "how earthquakes happen", "why the ocean is salty"]
STORY = ["a lighthouse keeper who befriends a seal", "a robot that learns to paint", "a dragon afraid of the dark",
         "two friends who find a map in a library book", "a cat who runs a bakery", "a tiny cloud that wants to rain",
         "a girl who can talk to trees", "a lost kite's journey around the world", "a snail entering a race",
         "a city where music makes the lights turn on"]
REWRITE = ["Our meeting is moved to Thursday at ten.", "Please remember to bring your own water bottle.",
           "The library will be closed for renovation next week.", "Thank you for your patience during the delay.",
           "Dinner is ready, come to the table.", "The train to Geneva leaves from platform four."]


def sentiment_prefix() -> str:
    shots = "\n\n".join(f"Review: {r}\nSentiment: {s}" for r, s in SENTIMENT_SHOTS)
    return ("Classify the sentiment of each product review as positive or negative.\n\n" + shots + "\n\n")


def units_prefix() -> str:
    return ("Convert the quantity to the unit asked for. Answer with the number and the unit symbol.\n\n"
            + "\n".join(f"Q: {q}\nA: {a}" for q, a in UNIT_SHOTS) + "\n")


def chat(cid: str, system: str | None, user: str, max_tokens: int, **extra) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}}


def completion(cid: str, prompt: str, max_tokens: int, **extra) -> dict:
    return {"custom_id": cid, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}}


def build(scale: int = 1, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    sp = sentiment_prefix()
    for i in range(60 * scale):  # compute-dense: long shared few-shot prefix, one-word answer
        review = REVIEWS[i % len(REVIEWS)]
        if i >= len(REVIEWS):
            review += f" {OPENERS[(i // len(REVIEWS)) % len(OPENERS)]}"
        out.append(completion(f"sentiment-{i:04d}", sp + f"Review: {review}\nSentiment:", 3, stop=["\n"]))
    up = units_prefix()
    for i in range(40 * scale):
        a, b = UNITS[i % len(UNITS)]
        q = f"{rng.choice([1, 2, 3, 4, 5, 7, 10, 12, 1.5, 2.5, 0.5])} {a} in {b}"
        out.append(completion(f"units-{i:04d}", up + f"Q: {q}\nA:", 12, stop=["\n"]))
    for i in range(60 * scale):  # short chat answers behind a short system prompt
        c = COUNTRIES[i % len(COUNTRIES)]
        out.append(chat(f"geo-{i:04d}", TUTOR, GEO_QUESTIONS[(i // len(COUNTRIES)) % len(GEO_QUESTIONS)].format(c=c),
                        32))
    for i in range(50 * scale):  # medium answers behind a long system prompt
        out.append(chat(f"support-{i:04d}", SUPPORT, SUPPORT_QUESTIONS[i % len(SUPPORT_QUESTIONS)]
                        + ("" if i < len(SUPPORT_QUESTIONS) else f" (order {1000 + i})"), 64))
    for i in range(40 * scale):  # memory-dense: long explanations
        topic = SCIENCE[i % len(SCIENCE)]
        ask = ["Explain {t}.", "Can you explain {t} to me in detail?", "Why is it true? Explain {t}."][i // len(SCIENCE) % 3]
        out.append(chat(f"science-{i:04d}", TEACHER, ask.format(t=topic), rng.choice([128, 160, 192])))
    for i in range(20 * scale):  # memory-dense: stories, some sampled with a seed
        extra = {"temperature": 0.8, "top_p": 0.95, "seed": i} if i % 4 == 3 else {}
        out.append(chat(f"story-{i:04d}", WRITER, f"Write a story about {STORY[i % len(STORY)]}.", 256, **extra))
    for i in range(30 * scale):  # no system prompt: the template's default one
        lang = ["French", "Spanish", "German"][i % 3]
        out.append(chat(f"rewrite-{i:04d}", None, f"Translate into {lang}: {REWRITE[i % len(REWRITE)]}", 48))
    rng.shuffle(out)  # arrival order mixes the groups, as a real batch file would
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "requests.jsonl"))
    ap.add_argument("--scale", type=int, default=1, help="multiply the number of requests")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows = build(args.scale, args.seed)
    Path(args.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} requests to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
