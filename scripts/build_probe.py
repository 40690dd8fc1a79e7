"""Build tunelab's general-ability probe: ``src/tunelab/assets/probe/general_probe.jsonl``.

Every item is a four-way multiple-choice question ``{"id", "skill", "question", "choices",
"answer"}`` (``answer`` indexes ``choices``), scored by log-likelihood over the choices
(lm-evaluation-harness ``multiple_choice``; :mod:`tunelab.evaluate.probe`).

Skills: ``facts`` and ``language`` are written by hand below; ``arithmetic``, ``reasoning``
(orderings, number sequences, weekdays, plus hand-written logic) and ``code`` (what a short
Python snippet prints: the answer is obtained by running the snippet) are generated from
templates with a fixed seed, so the file is a pure function of this script. All items were
written for tunelab and are released under CC0-1.0 (see ``LICENSE.md`` beside the file).

None is about countries, capitals, currencies or populations: the quickstart trains on
those (``src/tunelab/assets/countries.jsonl``), and a probe of them would measure the
training data rather than general ability.

    python scripts/build_probe.py           # rewrite the file
    python scripts/build_probe.py --check   # exit 1 if the shipped file is stale
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import sys
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "tunelab" / "assets"
OUT = ASSETS / "probe" / "general_probe.jsonl"
# replay: self trains on the base model's answers to these prompts; a probe item that is one of
# them would measure the replay data, not kept ability (tests/test_replay.py checks the same)
REPLAY_PROMPTS = ASSETS / "general_prompts.jsonl"
STOP = {"a", "an", "the", "is", "are", "of", "in", "on", "to", "for", "what", "which", "who",
        "how", "does", "do", "this", "that", "it", "and", "or", "give", "number", "answer",
        "one", "two", "sentences", "sentence", "word", "words", "python", "code", "program",
        "print", "prints"}
SEED = 20

# (question, right answer, three wrong answers)
FACTS = [
    ("What is the chemical symbol for gold?", "Au", "Ag", "Gd", "Go"),
    ("How many legs does a spider have?", "eight", "six", "ten", "four"),
    ("Who wrote the play Romeo and Juliet?", "William Shakespeare", "Charles Dickens",
     "Jane Austen", "Mark Twain"),
    ("Which planet is known as the Red Planet?", "Mars", "Venus", "Jupiter", "Saturn"),
    ("What is the largest planet in our solar system?", "Jupiter", "Saturn", "Neptune",
     "Earth"),
    ("Which gas do plants take in from the air for photosynthesis?", "carbon dioxide",
     "oxygen", "nitrogen", "helium"),
    ("At how many degrees Celsius does water boil at sea level?", "100", "50", "0", "212"),
    ("What is the largest mammal on Earth?", "the blue whale", "the elephant",
     "the giraffe", "the hippopotamus"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", "Vincent van Gogh", "Pablo Picasso",
     "Claude Monet"),
    ("Which organ pumps blood through the human body?", "the heart", "the liver",
     "the lungs", "the stomach"),
    ("What sweet food do bees make?", "honey", "sugar", "jam", "syrup"),
    ("What is the hardest natural substance?", "diamond", "iron", "granite", "glass"),
    ("Which star is at the centre of our solar system?", "the Sun", "Sirius",
     "the North Star", "the Moon"),
    ("What is the chemical formula of water?", "H2O", "CO2", "O2", "NaCl"),
    ("Who developed the theory of relativity?", "Albert Einstein", "Isaac Newton",
     "Charles Darwin", "Galileo Galilei"),
    ("Which planet is closest to the Sun?", "Mercury", "Venus", "Earth", "Mars"),
    ("Which instrument has 88 black and white keys?", "the piano", "the violin",
     "the flute", "the drum"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong", "Yuri Gagarin",
     "Buzz Aldrin", "John Glenn"),
    ("What do caterpillars turn into?", "butterflies", "spiders", "beetles", "frogs"),
    ("What is frozen water called?", "ice", "steam", "fog", "dew"),
    ("How many bones are in the adult human body?", "206", "106", "306", "26"),
    ("What do we call a baby frog?", "a tadpole", "a cub", "a chick", "a calf"),
    ("What is the boiling point of water in degrees Fahrenheit at sea level?", "212", "100",
     "32", "180"),
    ("Which animal is the fastest on land?", "the cheetah", "the horse", "the lion",
     "the ostrich"),
    ("What force pulls objects towards the Earth?", "gravity", "magnetism", "friction",
     "electricity"),
    ("Which animal has a trunk?", "the elephant", "the giraffe", "the rhino", "the hippo"),
    ("What is the largest organ of the human body?", "the skin", "the liver", "the brain",
     "the heart"),
    ("Which gas makes up most of the air we breathe?", "nitrogen", "oxygen",
     "carbon dioxide", "hydrogen"),
    ("What is the name of the natural satellite that orbits the Earth?", "the Moon",
     "the Sun", "Mars", "Titan"),
    ("Which animal has eight arms and lives in the sea?", "the octopus", "the starfish",
     "the crab", "the jellyfish"),
    ("How many colours are there in a rainbow?", "seven", "five", "six", "nine"),
    ("Which animal is known for changing its skin colour to blend in?", "the chameleon",
     "the rabbit", "the owl", "the goldfish"),
    ("What do we call animals that eat only plants?", "herbivores", "carnivores",
     "omnivores", "predators"),
    ("What is the main gas produced by plants during photosynthesis?", "oxygen",
     "carbon dioxide", "methane", "nitrogen"),
    ("Who wrote the novel Moby-Dick?", "Herman Melville", "Mark Twain", "Charles Dickens",
     "Jules Verne"),
    ("What is the chemical symbol for iron?", "Fe", "Ir", "In", "I"),
    ("What is the centre of an atom called?", "the nucleus", "the electron",
     "the shell", "the membrane"),
    ("How many sides does a hexagon have?", "six", "five", "seven", "eight"),
    ("Which planet do we live on?", "Earth", "Mars", "Venus", "Mercury"),
    ("What kind of animal is a whale?", "a mammal", "a fish", "a reptile", "an amphibian"),
    ("Who composed the Moonlight Sonata?", "Ludwig van Beethoven", "Wolfgang Amadeus Mozart",
     "Johann Sebastian Bach", "Frederic Chopin"),
    ("Which organ do humans use to breathe?", "the lungs", "the kidneys", "the heart",
     "the liver"),
    ("What is the speed of light in a vacuum, roughly?", "300,000 kilometres per second",
     "300 kilometres per second", "3,000 kilometres per hour", "30 metres per second"),
    ("Which shape has three sides?", "a triangle", "a square", "a circle", "a pentagon"),
    ("How many minutes are there in an hour?", "60", "100", "30", "24"),
    ("Which bird is a symbol of peace?", "the dove", "the crow", "the eagle", "the vulture"),
    ("How many hours are there in a day?", "24", "12", "36", "48"),
    ("What do bees collect from flowers to make honey?", "nectar", "pollen", "leaves",
     "water"),
    ("Which planet has the most famous ring system?", "Saturn", "Mars", "Mercury",
     "Venus"),
    ("Which scientist proposed the theory of evolution by natural selection?",
     "Charles Darwin", "Isaac Newton", "Marie Curie", "Nikola Tesla"),
    ("What is the tallest animal in the world?", "the giraffe", "the elephant",
     "the camel", "the horse"),
    ("What is the main ingredient of guacamole?", "avocado", "tomato", "potato", "banana"),
]

LANGUAGE = [
    ("What is the opposite of the word hot?", "cold", "warm", "heat", "sunny"),
    ("What is the past tense of the verb go?", "went", "goed", "gone", "going"),
    ("What is the plural of the word mouse?", "mice", "mouses", "meese", "mousen"),
    ("What is the plural of the word goose?", "geese", "gooses", "geeses", "goosen"),
    ("What is the past tense of the verb eat?", "ate", "eated", "eaten", "eating"),
    ("What is the opposite of the word happy?", "sad", "glad", "joyful", "cheerful"),
    ("Which word means the same as big?", "large", "tiny", "narrow", "short"),
    ("Which word means the same as quick?", "fast", "slow", "late", "heavy"),
    ("What is the plural of the word foot?", "feet", "foots", "footes", "feets"),
    ("What is the past tense of the verb run?", "ran", "runned", "running", "runs"),
    ("What is the opposite of the word up?", "down", "over", "high", "top"),
    ("Which of these words is a noun?", "table", "quickly", "blue", "run"),
    ("Which of these words is a verb?", "jump", "happy", "chair", "softly"),
    ("Which of these words is an adjective?", "green", "swim", "slowly", "house"),
    ("Which of these words is an adverb?", "quietly", "quiet", "quietness", "quieter"),
    ("What is the comparative form of small?", "smaller", "smallest", "more small",
     "smalls"),
    ("What is the superlative form of happy?", "happiest", "happier", "most happiest",
     "happyest"),
    ("Which word rhymes with cat?", "hat", "dog", "cup", "car"),
    ("Which word rhymes with moon?", "spoon", "mean", "man", "mine"),
    ("What is the opposite of the word early?", "late", "soon", "first", "quick"),
    ("What is the plural of the word tooth?", "teeth", "tooths", "toothes", "teeths"),
    ("What is the past tense of the verb write?", "wrote", "writed", "written", "writes"),
    ("Which word is spelled correctly?", "necessary", "neccessary", "necesary",
     "neccesary"),
    ("Which of these spellings is correct?", "separate", "seperate", "separete", "seprate"),
    ("What do you call a word that means the opposite of another word?", "an antonym",
     "a synonym", "a homophone", "an acronym"),
    ("What do you call a word that means the same as another word?", "a synonym",
     "an antonym", "a pronoun", "a prefix"),
    ("Which punctuation mark ends a question?", "a question mark", "a full stop",
     "a comma", "a colon"),
    ("What is the opposite of the word empty?", "full", "hollow", "bare", "vacant"),
    ("Which word means the same as begin?", "start", "finish", "stop", "pause"),
    ("What is the past tense of the verb sing?", "sang", "singed", "sung", "sings"),
    ("What is the plural of the word woman?", "women", "womans", "womens", "womanes"),
    ("What is the opposite of the word heavy?", "light", "dense", "large", "solid"),
    ("Which of these words is a conjunction?", "and", "dog", "jump", "red"),
    ("Which word is a preposition?", "under", "apple", "sing", "bright"),
    ("Which word means a baby dog?", "a puppy", "a kitten", "a calf", "a foal"),
    ("Which word means a baby cat?", "a kitten", "a puppy", "a cub", "a lamb"),
    ("What is the opposite of the word victory?", "defeat", "triumph", "success", "win"),
    ("What is the past tense of the verb bring?", "brought", "bringed", "brang", "brung"),
    ("Which word means very tired?", "exhausted", "excited", "energetic", "awake"),
    ("Which word means very hungry?", "starving", "full", "thirsty", "sleepy"),
    ("What is the opposite of the word generous?", "selfish", "kind", "giving", "friendly"),
    ("Which word completes the sentence: She ___ to school every day.", "walks", "walk",
     "walking", "walked to"),
    ("Which word completes the sentence: They ___ playing football now.", "are", "is",
     "am", "be"),
    ("Which word completes the sentence: I have ___ apple.", "an", "a", "the many", "some a"),
    ("What is the plural of the word sheep?", "sheep", "sheeps", "sheepes", "shoop"),
    ("What is the past tense of the verb think?", "thought", "thinked", "thank", "thunk"),
    ("Which letter is a vowel?", "e", "b", "k", "t"),
    ("How many letters are there in the English alphabet?", "26", "24", "28", "22"),
    ("What is the opposite of the word loud?", "quiet", "noisy", "strong", "bright"),
    ("Which word means the same as difficult?", "hard", "easy", "simple", "plain"),
]

LOGIC = [
    ("All roses are flowers. This plant is a rose. Is this plant a flower?", "yes", "no",
     "only in spring", "it cannot be known"),
    ("If it is raining, the ground is wet. The ground is dry. Is it raining?", "no", "yes",
     "only a little", "every day"),
    ("A box holds 3 red balls and no other balls. A ball is taken out. What colour is it?",
     "red", "blue", "green", "it cannot be known"),
    ("Tom is older than Sam. Is Sam younger than Tom?", "yes", "no", "they are the same age",
     "it cannot be known"),
    ("Every bird in the cage is yellow. Kiwi is a bird in the cage. What colour is Kiwi?",
     "yellow", "green", "red", "it cannot be known"),
    ("A train leaves at 3 pm and the trip takes 2 hours. When does it arrive?", "5 pm",
     "1 pm", "3 pm", "6 pm"),
    ("If you have two apples and eat one, how many apples do you have left?", "one", "two",
     "three", "none"),
    ("A week has seven days. How many days are there in two weeks?", "fourteen", "seven",
     "twelve", "twenty-one"),
    ("A bag holds 5 apples and you add 3 more. How many apples are in the bag?", "8", "2",
     "5", "15"),
    ("If a shape has four equal sides and four right angles, what is it?", "a square",
     "a triangle", "a circle", "an oval"),
    ("Mia is standing in a line. Two people are in front of her. In which position is she?",
     "third", "first", "second", "fourth"),
    ("A glass is full of water. Half of it is poured out. How full is the glass now?",
     "half full", "full", "empty", "a quarter full"),
]

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jin", "Kai",
         "Lena", "Max", "Nia", "Oli", "Pia", "Rex", "Sara", "Theo", "Uma"]
RELATIONS = [("taller", "shortest", "tallest"), ("older", "youngest", "oldest"),
             ("faster", "slowest", "fastest"), ("heavier", "lightest", "heaviest")]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
WORDS = ["garden", "planet", "window", "river", "pencil", "basket", "candle", "forest",
         "ladder", "orange", "rabbit", "silver", "summer", "tunnel", "violin", "yellow"]


def _content(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"[a-z0-9]+", text.lower())) - STOP


def _replay_words() -> list[frozenset[str]]:
    return [_content(json.loads(line)["prompt"])
            for line in REPLAY_PROMPTS.read_text(encoding="utf-8").splitlines() if line]


def _is_replay(question: str, replay: list[frozenset[str]]) -> bool:
    """True when one text's content words hold the other's and are at least half as many
    (a copy or a near copy, as tests/test_replay.py judges it)."""
    q = _content(question)
    return any((q <= p and 2 * len(q) >= len(p)) or (p <= q and 2 * len(p) >= len(q))
               for p in replay if p and q)


def _item(question: str, right: str, wrong: list[str], rng: random.Random
          ) -> tuple[str, list[str], int]:
    if len(set(wrong)) != 3 or right in wrong:
        raise ValueError(f"choices of {question!r} must be four different answers")
    choices = [right, *wrong]
    rng.shuffle(choices)
    return question, choices, choices.index(right)


def _near(value: int, rng: random.Random, spread: tuple[int, ...] = (1, 2, 10)) -> list[str]:
    """Three distinct wrong numbers close to ``value`` (off by one, two, ten...)."""
    wrong: list[int] = []
    while len(wrong) < 3:
        cand = value + rng.choice([-1, 1]) * rng.choice(spread)
        if cand != value and cand not in wrong and cand >= 0:
            wrong.append(cand)
    return [str(w) for w in wrong]


def arithmetic(rng: random.Random, replay: list[frozenset[str]], n: int = 50
               ) -> list[tuple[str, str, list[str]]]:
    out = []
    kinds = ["add", "sub", "mul", "div"]
    while len(out) < n:
        kind = kinds[len(out) % 4]
        if kind == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q, v = f"What is {a} + {b}?", a + b
        elif kind == "sub":
            a, b = rng.randint(30, 99), rng.randint(10, 29)
            q, v = f"What is {a} - {b}?", a - b
        elif kind == "mul":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            q, v = f"What is {a} times {b}?", a * b
        else:
            b, v = rng.randint(2, 9), rng.randint(2, 12)
            q = f"What is {b * v} divided by {b}?"
        if q not in {o[0] for o in out} and not _is_replay(q, replay):
            out.append((q, str(v), _near(v, rng)))
    return out


def _ordering(rng: random.Random) -> tuple[str, str, list[str]]:
    a, b, c = rng.sample(NAMES, 3)
    rel, least, most = rng.choice(RELATIONS)
    ask_least = rng.random() < 0.5
    q = (f"{a} is {rel} than {b}. {b} is {rel} than {c}. Who is the "
         f"{least if ask_least else most}?")
    right = c if ask_least else a
    return q, right, [x for x in (a, b, c) if x != right] + ["it cannot be known"]


def _sequence(rng: random.Random) -> tuple[str, str, list[str]]:
    start, step = rng.randint(1, 20), rng.randint(2, 9)
    terms = [start + i * step for i in range(4)]
    v = start + 4 * step
    q = f"What number comes next in the sequence {', '.join(map(str, terms))}, ...?"
    return q, str(v), _near(v, rng, (1, 2, step))


def _weekday(rng: random.Random) -> tuple[str, str, list[str]]:
    today, k = rng.randrange(7), rng.randint(2, 10)
    q = f"If today is {DAYS[today]}, what day of the week will it be in {k} days?"
    right = DAYS[(today + k) % 7]
    wrong = rng.sample([d for d in DAYS if d != right], 3)
    return q, right, wrong


def reasoning(rng: random.Random, replay: list[frozenset[str]]
              ) -> list[tuple[str, str, list[str]]]:
    out = [(q, r, list(w)) for q, r, *w in LOGIC]
    makers = [_ordering, _sequence, _weekday]
    while len(out) < 50:
        item = makers[len(out) % 3](rng)
        if item[0] not in {o[0] for o in out} and not _is_replay(item[0], replay):
            out.append(item)
    return out


def _run(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(code, {})  # noqa: S102 - our own template code, to get the true output
    return buf.getvalue().strip()


def _snippet(kind: int, rng: random.Random) -> tuple[str, list[str] | None]:
    """A short Python program and, for string outputs, its wrong answers (else None)."""
    word = rng.choice(WORDS)
    if kind == 0:
        a, b, c = rng.randint(2, 9), rng.randint(2, 6), rng.randint(1, 9)
        return f"x = {a}\ny = x * {b} - {c}\nprint(y)", None
    if kind == 1:
        i = rng.randint(0, 4)
        wrong = [ch for ch in dict.fromkeys(word) if ch != word[i]][:3]
        return f"s = '{word}'\nprint(s[{i}])", wrong
    if kind == 2:
        xs = rng.sample(range(1, 20), rng.randint(3, 6))
        op = rng.choice(["len", "sum", "max", "min"])
        return f"xs = {xs}\nprint({op}(xs))", None
    if kind == 3:
        n = rng.randint(3, 12)
        return f"total = 0\nfor i in range({n}):\n    total += i\nprint(total)", None
    if kind == 4:
        k, m, c = rng.randint(1, 9), rng.randint(2, 4), rng.randint(0, 5)
        return f"def f(n):\n    return n * {m} + {c}\n\nprint(f({k}))", None
    if kind == 5:
        a, b = rng.sample(range(1, 30), 2)
        return (f"a = {a}\nb = {b}\nif a > b:\n    print('a')\nelse:\n    print('b')",
                ["ab", "True", "False"])
    if kind == 6:
        return (f"s = '{word}'\nprint(s.upper())",
                [word, word.capitalize(), word[::-1].upper()])
    xs = rng.sample(range(1, 20), 5)
    i = rng.randint(1, 4)
    return f"xs = {xs}\nprint(xs[-{i}])", None


def code(rng: random.Random, replay: list[frozenset[str]], n: int = 50
         ) -> list[tuple[str, str, list[str]]]:
    out = []
    seen = set()
    while len(out) < n:
        src, wrong = _snippet(len(out) % 8, rng)
        if src in seen or _is_replay(src, replay):
            continue
        seen.add(src)
        right = _run(src)
        if wrong is None:
            wrong = _near(int(right), rng)
        q = f"What does this Python program print?\n\n{src}\n"
        out.append((q, right, wrong))
    return out


def build() -> list[dict]:
    rng = random.Random(SEED)
    replay = _replay_words()
    skills = {
        "facts": [(q, r, list(w)) for q, r, *w in FACTS],
        "language": [(q, r, list(w)) for q, r, *w in LANGUAGE],
        "arithmetic": arithmetic(rng, replay),
        "reasoning": reasoning(rng, replay),
        "code": code(rng, replay),
    }
    rows, seen = [], set()
    for skill, items in skills.items():
        for n, (question, right, wrong) in enumerate(items, 1):
            if question in seen:
                raise ValueError(f"duplicate probe question: {question!r}")
            if _is_replay(question, replay):
                raise ValueError(f"probe question {question!r} repeats a replay prompt")
            seen.add(question)
            q, choices, answer = _item(question, right, wrong, rng)
            rows.append({"id": f"{skill}-{n:03d}", "skill": skill, "question": q,
                         "choices": choices, "answer": answer})
    return rows


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str]) -> int:
    text = render(build())
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text(encoding="utf-8") != text:
            print(f"error: {OUT} is stale: run python scripts/build_probe.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({text.count(chr(10))} items)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
