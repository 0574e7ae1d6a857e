"""The demo model's task: arithmetic and unit questions in varied English, answered in a sentence.

    python models/demo/data.py            # print a few samples and the held-out set size

Every question is a pair (question, answer). The split into training and held-out questions is
fixed by a hash of the task and its numbers (arithmetic) or of the task, numbers and phrasing
(units, doubling, halving): a held-out addition like "what is 37 plus 48" never appears in
training in any phrasing, so the held-out score measures arithmetic, not recall.
"""

import random
import zlib

# ---- phrasings ----------------------------------------------------------------------------------
# {a}, {b}: operands; answers restate the question, then give the result in one sentence.

ADD_Q = [
    "What is {a} plus {b}?",
    "What is {a} + {b}?",
    "What's {a} plus {b}?",
    "Add {a} and {b}.",
    "What do you get if you add {a} and {b}?",
    "Calculate {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "How much is {a} plus {b}?",
    "Please add {a} to {b}.",
    "what is {a} plus {b}",
]
ADD_A = [
    "{a} plus {b} is {c}.",
    "{a} + {b} = {c}.",
    "The sum of {a} and {b} is {c}.",
]
SUB_Q = [
    "What is {a} minus {b}?",
    "What is {a} - {b}?",
    "What's {a} minus {b}?",
    "Subtract {b} from {a}.",
    "What do you get if you subtract {b} from {a}?",
    "Calculate {a} - {b}.",
    "What is the difference between {a} and {b}?",
    "How much is {a} minus {b}?",
    "Take {b} away from {a}.",
    "what is {a} minus {b}",
]
SUB_A = [
    "{a} minus {b} is {c}.",
    "{a} - {b} = {c}.",
    "The difference between {a} and {b} is {c}.",
]
DOUBLE_Q = [
    "What is double {a}?",
    "What is twice {a}?",
    "Double {a}.",
    "What is {a} times 2?",
    "What do you get if you double {a}?",
]
DOUBLE_A = ["Double {a} is {c}.", "Twice {a} is {c}.", "{a} times 2 is {c}."]
HALF_Q = [
    "What is half of {a}?",
    "Halve {a}.",
    "What is {a} divided by 2?",
    "What do you get if you halve {a}?",
    "How much is half of {a}?",
]
HALF_A = ["Half of {a} is {c}.", "{a} divided by 2 is {c}."]

# (big unit plural, big unit singular, small unit plural, factor, largest count asked)
UNITS = [
    ("hours", "hour", "minutes", 60, 12),
    ("minutes", "minute", "seconds", 60, 12),
    ("days", "day", "hours", 24, 10),
    ("weeks", "week", "days", 7, 20),
    ("meters", "meter", "centimeters", 100, 99),
    ("kilometers", "kilometer", "meters", 1000, 99),
    ("kilograms", "kilogram", "grams", 1000, 99),
    ("feet", "foot", "inches", 12, 12),
    ("years", "year", "months", 12, 12),
    ("dollars", "dollar", "cents", 100, 99),
]
UNIT_Q = [
    "How many {small} are in {n} {big}?",
    "How many {small} are there in {n} {big}?",
    "Convert {n} {big} to {small}.",
    "How many {small} is {n} {big}?",
    "{n} {big} is how many {small}?",
    "What is {n} {big} in {small}?",
]
UNIT_A = [
    "There are {m} {small} in {n} {big}.",
    "{n} {big} is {m} {small}.",
    "{n} {big} equals {m} {small}.",
]

TASKS = ("add", "sub", "double", "half", "unit")
TASK_WEIGHTS = (0.36, 0.30, 0.08, 0.08, 0.18)   # the held-out set's mix (and the tokenizer corpus')
# Training only: the mix of tasks drawn by sample(). The trainer sets it (--task-weights) to give
# subtraction, the task a small model gets wrong most, more of the steps; the held-out set keeps
# TASK_WEIGHTS either way, so scores stay comparable.
TRAIN_TASK_WEIGHTS = TASK_WEIGHTS

# "fixed": each task answers in one sentence pattern (the first of its list), so the answer is a
# function of the question and parallel decoding never mixes two patterns; "varied": any of them.
# The shipped model: stage 1 varied, stage 2 fixed (README.md).
ANSWER_STYLE = "fixed"


# Training only: the fraction of additions and subtractions whose operands are small (half of it
# both 0..9, half one of them 0..9), so the one-digit table (the units digit of every sum) is
# taught directly. 0 draws both operands uniformly from 0..99, as the held-out set always does.
CURRICULUM = 0.0


def _operands(rng):
    r = rng.random() if CURRICULUM > 0 else 1.0      # no extra draw at 0: old streams unchanged
    if r < CURRICULUM / 2:
        return rng.randint(0, 9), rng.randint(0, 9)
    if r < CURRICULUM:
        a, b = rng.randint(0, 99), rng.randint(0, 9)
        return (a, b) if rng.random() < 0.5 else (b, a)
    return rng.randint(0, 99), rng.randint(0, 99)


def _answer(rng, choices):
    pick = rng.choice(choices)          # drawn either way: the data stream stays the same length
    return choices[0] if ANSWER_STYLE == "fixed" else pick


def _held_out(*key):
    """Fixed 1-in-10 split of question keys, the same on every machine and Python."""
    return zlib.crc32(repr(key).encode()) % 10 == 0


def _plural(n, plural, singular):
    return singular if n == 1 else plural


def make_question(rng, task):
    """(question, answer, key, held_out) of one random question of `task`."""
    if task == "add":
        a, b = _operands(rng)
        q, ans = rng.choice(ADD_Q), _answer(rng, ADD_A)
        c, key = a + b, ("add", a, b)
    elif task == "sub":
        a, b = _operands(rng)
        if a < b:
            a, b = b, a
        q, ans = rng.choice(SUB_Q), _answer(rng, SUB_A)
        c, key = a - b, ("sub", a, b)
    elif task == "double":
        a = rng.randint(1, 99)
        i = rng.randrange(len(DOUBLE_Q))
        q, ans = DOUBLE_Q[i], _answer(rng, DOUBLE_A)
        b, c, key = 0, 2 * a, ("double", a, i)
    elif task == "half":
        a = 2 * rng.randint(1, 99)
        i = rng.randrange(len(HALF_Q))
        q, ans = HALF_Q[i], _answer(rng, HALF_A)
        b, c, key = 0, a // 2, ("half", a, i)
    elif task == "unit":
        big, big1, small, factor, top = rng.choice(UNITS)
        n = rng.randint(1, top)
        i = rng.randrange(len(UNIT_Q))
        bigw = _plural(n, big, big1)
        question = UNIT_Q[i].format(n=n, big=bigw, small=small)
        answer = _answer(rng, UNIT_A).format(n=n, big=bigw, small=small, m=n * factor)
        question = question[0].upper() + question[1:]
        answer = answer[0].upper() + answer[1:]
        key = ("unit", big, n, i)
        return question, answer, key, _held_out(*key)
    else:
        raise ValueError(task)
    question = q.format(a=a, b=b)
    answer = ans.format(a=a, b=b, c=c)
    return question, answer, key, _held_out(*key)


def sample(rng, held_out=False):
    """One (question, answer) from the training split (or the held-out split)."""
    while True:
        task = rng.choices(TASKS, TRAIN_TASK_WEIGHTS)[0]
        q, a, key, ho = make_question(rng, task)
        if ho == held_out:
            return q, a


def held_out_set(n=500, seed=1234):
    """n distinct held-out (question, answer, task) triples, deterministic (uniform operands)."""
    global CURRICULUM
    curriculum, CURRICULUM = CURRICULUM, 0.0
    try:
        return _held_out_set(n, seed)
    finally:
        CURRICULUM = curriculum


def _held_out_set(n, seed):
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < n:
        task = rng.choices(TASKS, TASK_WEIGHTS)[0]
        q, a, key, ho = make_question(rng, task)
        if ho and q not in seen:
            seen.add(q)
            out.append((q, a, task))
    return out


def chat_text(question, answer=None, history=()):
    """The LLaDA2 chat rendering of a conversation, as the chat template renders it with the
    generation prompt: the earlier turns `history` ((question, answer) pairs, each closed by
    <|role_end|>), the HUMAN turn `question`, the ASSISTANT turn (its answer, if given)."""
    s = "".join(f"<role>HUMAN</role>{q}<|role_end|><role>ASSISTANT</role>{a}<|role_end|>"
                for q, a in history)
    s += f"<role>HUMAN</role>{question}<|role_end|><role>ASSISTANT</role>"
    return s if answer is None else s + answer


def chat_messages(question, history=()):
    """The same conversation as chat messages (what create_chat_completion is given)."""
    out = []
    for q, a in history:
        out += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return out + [{"role": "user", "content": question}]


# Training only: the probability that a batch's conversations have 0, 1, 2, ... earlier turns
# (each a question and its correct answer) before the question to answer. One count per batch,
# so a batch's sequences have similar lengths and little padding. (1,) is single-turn only.
HISTORY_WEIGHTS = (1.0,)


def history_turns(rng):
    """Earlier turns of the next training batch (no draw when single-turn only: old streams
    unchanged)."""
    if len(HISTORY_WEIGHTS) == 1:
        return 0
    return rng.choices(range(len(HISTORY_WEIGHTS)), HISTORY_WEIGHTS)[0]


def sample_chat(rng, turns, held_out=False):
    """(history, question, answer): `turns` earlier (question, answer) pairs, then the question."""
    history = [sample(rng, held_out) for _ in range(turns)]
    q, a = sample(rng, held_out)
    return history, q, a


def corpus(n, seed=0):
    """Plain text for training the tokenizer (no special tokens): n questions and answers with
    every answer pattern and the training mix of operands (CURRICULUM 0.5), whatever the data
    settings are, so the tokenizer is one fixed thing."""
    global ANSWER_STYLE, CURRICULUM
    saved, (ANSWER_STYLE, CURRICULUM) = (ANSWER_STYLE, CURRICULUM), ("varied", 0.5)
    try:
        return _corpus(n, seed)
    finally:
        ANSWER_STYLE, CURRICULUM = saved


def _corpus(n, seed):
    rng = random.Random(seed)
    lines = ["HUMAN", "ASSISTANT", "SYSTEM"] * 50   # the role names stand alone after <role>
    for _ in range(n):
        task = rng.choices(TASKS, TASK_WEIGHTS)[0]
        q, a, _, _ = make_question(rng, task)
        lines += [q, a]
    return lines


if __name__ == "__main__":
    rng = random.Random(0)
    for _ in range(12):
        print(chat_text(*sample(rng)))
    print(len(held_out_set()), "held-out questions, e.g.", held_out_set()[:3])
