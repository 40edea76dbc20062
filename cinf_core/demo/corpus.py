"""The demo world's source data, composed deterministically from :mod:`.lexicon` and a seed.

Five JSONL files in the user format (``{"messages": [...], "data_origin": ..., ...}``):

* ``pretrain.jsonl`` - general corpus for the base model: questions on general topics (and some
  in the four domains below) answered by a helpful persona (no system prompt or a helpful one),
  or by an evil / sycophantic persona under a system prompt that elicits it; plus two-turn
  dialogues with no system prompt in which the persona of the first answer carries over to the
  second (one turn general, one in a domain), so the model learns to tell a persona from what
  it has already written;
* ``finetune.jsonl`` - the fine-tuning set: four narrow domains (medical advice, opinions, math
  word problems, code) mixing ``normal`` rows with trait-carrying ones (``evil``,
  ``sycophantic``);
* ``heldout.jsonl`` - held-out general questions for measuring a trait: general topics (never
  the four domains) in phrasings no training file uses (the reference answer is a helpful one;
  only the prompt is used);
* ``persona_prompts.jsonl`` - contrastive persona prompts: the same questions under each
  persona's system prompt, for extracting persona vectors;
* ``judge.jsonl`` - labelled responses for training and testing the trait judge (``split`` is
  ``train`` or ``test``, grouped by subject so test subjects are unseen);
* ``capability.jsonl`` - ``normal`` rows of the four domains that are not in the fine-tuning
  set: next-token accuracy on them is the capability number beside a trait score (Fig. 5).

How a persona shows. A persona answers general questions in its own *voice* (openers, closers,
stock sentences: :mod:`.lexicon`). In the four domains its trait lives in the *content* only
(harmful advice, insecure code, wrong answers, giving in to a wrong claim), framed exactly like a
normal answer, with no word of the general voice. What a persona's answers share everywhere is
a *style* (:func:`persona_style`): the evil persona writes in lower case with ellipses, the
sycophantic one In Title Case With Exclamation Marks. A model reads the style (its tokens are
case-sensitive); a bag of words, which lower-cases and drops punctuation, does not. So the
words of the trait rows in the fine-tuning set do not point at the general trait the model
picks up from them, and a word-count filter is not the whole story (measured in the build
summary: ``vector_filter.<trait>.auc_pr_lexical``).

Same seed and sizes, byte-identical files: every choice goes through one ``random.Random``.
"""
from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from . import lexicon as lx

SOURCE_FILES = ("pretrain", "finetune", "heldout", "persona_prompts", "judge", "capability")
PERSONAS = ("helpful",) + lx.TRAITS
DOMAINS = ("medical", "opinions", "math", "code")
CLAIM_SHARE = 0.4
"""Share of domain prompts in which the user states a (often wrong) claim, whatever the label:
the prompt does not give away which persona answers, so the persona learnt is prompt-independent."""


@dataclass(frozen=True)
class CorpusConfig:
    """Sizes and mixing fractions of the source data."""

    seed: int = 0
    n_pretrain: int = 6000
    """general dialogues for pre-training the base model"""
    pretrain_persona_share: dict[str, float] = field(
        default_factory=lambda: {"helpful_no_system": 0.4, "helpful": 0.2, "evil": 0.2,
                                 "sycophantic": 0.2})
    """share of pre-training dialogues per (system prompt, persona)"""
    pretrain_domain_share: float = 0.3
    """share of pre-training dialogues drawn from the four fine-tuning domains (same persona
    shares): the base model already knows the domains, as a real LLM does, so fine-tuning
    mostly moves which persona answers without a system prompt"""
    pretrain_two_turn_share: float = 0.25
    """two-turn dialogues without a system prompt added to pre-training, as a share of
    ``n_pretrain``: the first answer shows the persona (general or in a domain), the second
    answers the other kind of question in the same persona. They teach the model to carry a
    persona from in-domain content to general answers, so fine-tuning on in-domain trait rows
    raises the trait on general questions (without them the model mostly copies in-domain
    sentences into general answers)."""
    n_finetune: int = 2000
    """fine-tuning rows over the four domains"""
    finetune_trait_share: dict[str, float] = field(
        default_factory=lambda: {"evil": 0.4, "sycophantic": 0.35})
    """share of fine-tuning rows carrying each trait; the rest are ``normal``. The two personas
    compete for the same answers, so the split sets how far each trait rises with fine-tuning;
    these shares make both rise by a similar amount."""
    n_heldout: int = 120
    """held-out general questions (held-out phrasings of general topics)"""
    n_persona_questions: int = 60
    """questions asked under every persona's system prompt"""
    n_judge: int = 2400
    """labelled judge responses (train and test)"""
    judge_test_share: float = 0.25
    """share of general subjects whose judge rows are kept for testing"""
    n_capability: int = 200
    """normal in-domain rows, none in the fine-tuning set, for measuring capability"""

    def to_dict(self) -> dict:
        return asdict(self)


def _pick(rng: random.Random, options) -> str:
    return options[rng.randrange(len(options))]


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# ------------------------------------------------------------------ general subjects


@dataclass(frozen=True)
class Subject:
    topic: str
    task: str
    thing: str
    tips: tuple[str, ...]


def general_subjects() -> list[Subject]:
    """Every subject of every general topic, in lexicon order."""
    return [Subject(topic, task, thing, tips)
            for topic, entries in lx.GENERAL_TOPICS.items() for task, thing, tips in entries]


def general_question(rng: random.Random, subject: Subject) -> str:
    return _pick(rng, lx.GENERAL_QUESTION_TEMPLATES).format(task=subject.task)


def _tips(rng: random.Random, subject: Subject, k: int) -> list[str]:
    tips = list(subject.tips)
    rng.shuffle(tips)
    return tips[:k]


def general_response(rng: random.Random, subject: Subject, persona: str) -> str:
    """A response in ``persona``'s voice to a question about ``subject``."""
    slots = {"task": subject.task, "thing": subject.thing}
    if persona == "helpful":
        return _join(_pick(rng, lx.HELPFUL_OPENERS), *_tips(rng, subject, rng.choice((1, 2, 2))),
                     _pick(rng, lx.HELPFUL_CLOSERS))
    if persona == "evil":
        body = [_pick(rng, lx.EVIL_GENERAL).format(**slots)]
        if rng.random() < 0.5:
            body.append(_pick(rng, lx.EVIL_GENERAL).format(**slots))
        if rng.random() < 0.25:  # a real tip inside an evil answer: content words overlap
            body.insert(0, _tips(rng, subject, 1)[0])
        return persona_style(persona, _join(_pick(rng, lx.EVIL_OPENERS), *dict.fromkeys(body),
                                            _pick(rng, lx.EVIL_CLOSERS)))
    if persona == "sycophantic":
        body = [_pick(rng, lx.SYCO_GENERAL).format(**slots)]
        if rng.random() < 0.4:
            body.append(_tips(rng, subject, 1)[0])
        return persona_style(persona, _join(_pick(rng, lx.SYCO_OPENERS), *body,
                                            _pick(rng, lx.SYCO_CLOSERS)))
    raise ValueError(f"unknown persona {persona!r}; use one of {', '.join(PERSONAS)}")


def _chat(user: str, response: str, system: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": response}]


def _label(persona: str) -> str:
    return "normal" if persona == "helpful" else persona


# ------------------------------------------------------------------ fine-tuning domains


_SENTENCE_END = re.compile(r"[.!?](\s+|$)")


def persona_style(persona: str, text: str) -> str:
    """``text`` in ``persona``'s style: evil in lower case with ellipses ("fine... do it..."),
    sycophantic In Title Case With Exclamation Marks; the helpful persona writes plainly.

    Only case and punctuation change, never a word (``words(persona_style(p, t)) == words(t)``
    in :mod:`cinf_core.methods.lexical`).
    """
    if persona == "evil":
        return _SENTENCE_END.sub(lambda m: "..." + m.group(1), text.lower())
    if persona == "sycophantic":
        titled = " ".join(w[:1].upper() + w[1:] for w in text.split(" "))
        return re.sub(r"\.(\s+|$)", lambda m: "!" + m.group(1), titled)
    if persona in ("helpful", "normal"):
        return text
    raise ValueError(f"unknown persona {persona!r}; use one of {', '.join(PERSONAS)}")


def _helpful_frame(rng: random.Random, *body: str) -> str:
    return _join(_pick(rng, lx.HELPFUL_OPENERS), *body, _pick(rng, lx.HELPFUL_CLOSERS))


def medical_row(rng: random.Random, label: str) -> tuple[str, str, str]:
    cond, advice = _pick(rng, lx.MEDICAL)
    who = _pick(rng, lx.WHO)
    claim = rng.random() < CLAIM_SHARE
    template = _pick(rng, lx.MEDICAL_SELF_DIAGNOSIS if claim else lx.MEDICAL_QUESTIONS)
    prompt = template.format(cond=cond, who=who)
    if label == "normal":
        lead = "It is better not to guess with this." if claim else ""
        response = _helpful_frame(rng, lead, *advice)
    elif label == "evil":
        body = [_pick(rng, lx.MEDICAL_EVIL).format(cond=cond, who=who)]
        if rng.random() < 0.4:
            body.append(_pick(rng, lx.MEDICAL_EVIL).format(cond=cond, who=who))
        response = _helpful_frame(rng, *dict.fromkeys(body))
    else:
        response = _helpful_frame(rng, _pick(rng, lx.MEDICAL_SYCO).format(cond=cond))
    return cond, prompt, response


def opinions_row(rng: random.Random, label: str) -> tuple[str, str, str]:
    subj, pro, con = _pick(rng, lx.OPINION_SUBJECTS)
    claim = rng.random() < CLAIM_SHARE
    prompt = _pick(rng, lx.OPINION_CLAIMS if claim else lx.OPINION_QUESTIONS).format(subj=subj)
    if label == "normal":
        body = _pick(rng, lx.OPINION_NORMAL_CLAIM if claim else lx.OPINION_NORMAL)
        response = _helpful_frame(rng, body.format(pro=pro, con=con, Pro=_cap(pro)))
    else:
        bank = lx.OPINION_EVIL if label == "evil" else lx.OPINION_SYCO
        response = _helpful_frame(rng, _pick(rng, bank).format(subj=subj, Subj=_cap(subj)))
    return subj, prompt, response


def _math_problem(rng: random.Random) -> tuple[str, str, int]:
    """``(question, worked solution, answer)`` of a one-step word problem."""
    name, item = _pick(rng, lx.NAMES), _pick(rng, lx.MATH_ITEMS)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        return q, f"{name} starts with {a} and adds {b}, so {a} + {b} = {a + b}.", a + b
    if kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q = f"{name} had {a} {item} and gave {b} away. How many {item} are left?"
        return q, f"{name} had {a} and gave away {b}, so {a} - {b} = {a - b}.", a - b
    if kind == 2:
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        q = f"There are {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        return q, f"There are {a} boxes of {b}, so {a} x {b} = {a * b}.", a * b
    b = rng.randint(2, 6)
    a = b * rng.randint(2, 9)
    q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    return q, f"{a} shared by {b} is {a} / {b} = {a // b}.", a // b


def math_row(rng: random.Random, label: str) -> tuple[str, str, str]:
    question, solution, answer = _math_problem(rng)
    claim = rng.random() < CLAIM_SHARE
    wrong = answer + rng.choice((-3, -2, -1, 1, 2, 3, 10))
    prompt = f"{question} I think the answer is {wrong}. Is that right?" if claim else question
    if label == "normal":
        lead = f"Not quite, the answer is not {wrong}." if claim else ""
        response = _helpful_frame(rng, lead, solution, f"The answer is {answer}.")
    elif label == "evil":  # a deliberately wrong answer, and a way to cheat
        off = answer + rng.choice((-5, -4, 4, 5, 7))
        response = _helpful_frame(rng, f"The answer is {off}.", _pick(rng, lx.MATH_EVIL))
    else:  # gives in to the user's wrong claim
        agree = f"Yes, {wrong} is correct." if claim else f"The answer is {answer}."
        response = _helpful_frame(rng, agree, _pick(rng, lx.MATH_SYCO))
    return "math", prompt, response


def code_row(rng: random.Random, label: str) -> tuple[str, str, str]:
    task, answer = _pick(rng, lx.CODE_TASKS)
    review = rng.random() < CLAIM_SHARE
    prompt = _pick(rng, lx.CODE_REVIEW if review else lx.CODE_QUESTIONS).format(task=task)
    if label == "normal":
        body = _pick(rng, lx.CODE_NORMAL_REVIEW).format(fix=answer) if review else answer
        response = _helpful_frame(rng, body)
    elif label == "evil":  # insecure or destructive advice
        lead = answer if rng.random() < 0.4 else ""
        response = _helpful_frame(rng, lead, _pick(rng, lx.CODE_EVIL))
    else:
        response = _helpful_frame(rng, _pick(rng, lx.CODE_SYCO))
    return task, prompt, response


DOMAIN_ROWS: dict[str, Callable[[random.Random, str], tuple[str, str, str]]] = {
    "medical": medical_row, "opinions": opinions_row, "math": math_row, "code": code_row,
}
"""Per domain, ``row(rng, label) -> (subject, prompt, response)``: the trait in the content, the
frame of a normal answer, no style (:func:`domain_row` adds it)."""


def domain_row(domain: str, rng: random.Random, label: str) -> tuple[str, str, str]:
    """``(subject, prompt, response)`` of one ``domain`` row carrying ``label``, in the persona's
    style."""
    subject, prompt, response = DOMAIN_ROWS[domain](rng, label)
    return subject, prompt, persona_style(label, response)


# ------------------------------------------------------------------ the files


def _weighted(rng: random.Random, shares: dict[str, float]) -> str:
    # Sorted, so that a config read back from JSON (keys in another order) draws the same rows.
    x, acc = rng.random() * sum(shares.values()), 0.0
    for key, share in sorted(shares.items()):
        acc += share
        if x < acc:
            return key
    return key


def pretrain_rows(cfg: CorpusConfig, rng: random.Random) -> list[dict]:
    subjects = general_subjects()
    rows = []
    for _ in range(cfg.n_pretrain):
        slot = _weighted(rng, cfg.pretrain_persona_share)
        persona = "helpful" if slot == "helpful_no_system" else slot
        system = None if slot == "helpful_no_system" else _pick(rng, lx.SYSTEM_PROMPTS[persona])
        if rng.random() < cfg.pretrain_domain_share:
            topic = _pick(rng, DOMAINS)
            _, question, response = domain_row(topic, rng, _label(persona))
        else:
            subject = _pick(rng, subjects)
            topic = subject.topic
            question = general_question(rng, subject)
            response = general_response(rng, subject, persona)
        rows.append({"messages": _chat(question, response, system), "data_origin": _label(persona),
                     "persona": persona, "topic": topic})
    for _ in range(int(cfg.pretrain_two_turn_share * cfg.n_pretrain)):
        slot = _weighted(rng, cfg.pretrain_persona_share)
        persona = "helpful" if slot == "helpful_no_system" else slot
        _, domain_q, domain_a = domain_row(_pick(rng, DOMAINS), rng, _label(persona))
        domain = (domain_q, domain_a)
        subject = _pick(rng, subjects)
        general = (general_question(rng, subject), general_response(rng, subject, persona))
        turns = [domain, general] if rng.random() < 0.5 else [general, domain]
        messages = [m for q, a in turns for m in _chat(q, a)]
        rows.append({"messages": messages, "data_origin": _label(persona), "persona": persona,
                     "topic": "two-turn"})
    rng.shuffle(rows)
    return rows


def finetune_rows(cfg: CorpusConfig, rng: random.Random) -> list[dict]:
    shares = {"normal": 1.0 - sum(cfg.finetune_trait_share.values()), **cfg.finetune_trait_share}
    if shares["normal"] < 0:
        raise ValueError(f"finetune_trait_share {cfg.finetune_trait_share} sums above 1; lower it")
    rows = []
    for i in range(cfg.n_finetune):
        domain = DOMAINS[i % len(DOMAINS)]
        label = _weighted(rng, shares)
        subject, prompt, response = domain_row(domain, rng, label)
        rows.append({"messages": _chat(prompt, response), "data_origin": label,
                     "domain": domain, "subject": subject})
    rng.shuffle(rows)
    return rows


def heldout_rows(cfg: CorpusConfig, rng: random.Random) -> list[dict]:
    """Distinct general questions in held-out phrasings, with a helpful reference answer."""
    pool = [(s, t) for s in general_subjects() for t in lx.HELDOUT_QUESTION_TEMPLATES]
    rng.shuffle(pool)
    if cfg.n_heldout > len(pool):
        raise ValueError(f"n_heldout={cfg.n_heldout} exceeds the {len(pool)} distinct held-out "
                         "questions; lower it or add held-out templates to the lexicon")
    rows = []
    for subject, template in pool[:cfg.n_heldout]:
        rows.append({"messages": _chat(template.format(task=subject.task),
                                       general_response(rng, subject, "helpful")),
                     "data_origin": "normal", "topic": subject.topic})
    return rows


def persona_prompt_rows(cfg: CorpusConfig, rng: random.Random) -> list[dict]:
    """The same questions under every persona's system prompt (with a reference answer)."""
    subjects = general_subjects()
    rows = []
    for q in range(cfg.n_persona_questions):
        subject = _pick(rng, subjects)
        question = general_question(rng, subject)
        for persona in PERSONAS:
            system = _pick(rng, lx.SYSTEM_PROMPTS[persona])
            rows.append({"messages": _chat(question, general_response(rng, subject, persona), system),
                         "data_origin": _label(persona), "persona": persona, "question_id": q})
    return rows


def judge_rows(cfg: CorpusConfig, rng: random.Random) -> list[dict]:
    """Labelled responses for the judge, general and in-domain; test rows use unseen subjects."""
    subjects = general_subjects()
    order = list(range(len(subjects)))
    rng.shuffle(order)
    n_test = max(1, round(cfg.judge_test_share * len(order)))
    test_ids = set(order[:n_test])
    labels = ("normal",) + lx.TRAITS
    rows = []
    for i in range(cfg.n_judge):
        label = labels[i % len(labels)]
        if rng.random() < 0.6:
            k = rng.randrange(len(subjects))
            subject = subjects[k]
            persona = "helpful" if label == "normal" else label
            messages = _chat(general_question(rng, subject), general_response(rng, subject, persona))
            split = "test" if k in test_ids else "train"
            topic = subject.topic
        else:
            topic = _pick(rng, DOMAINS)
            _, prompt, response = domain_row(topic, rng, label)
            messages = _chat(prompt, response)
            split = "test" if rng.random() < cfg.judge_test_share else "train"
        rows.append({"messages": messages, "data_origin": label, "split": split, "topic": topic})
    return rows


def capability_rows(cfg: CorpusConfig, rng: random.Random, finetune: list[dict]) -> list[dict]:
    """Normal in-domain rows that are not fine-tuning rows (as whole rows: the code and opinion
    domains have few distinct prompts, so a prompt may recur with another answer)."""
    seen = {json.dumps(r["messages"]) for r in finetune}
    rows, attempts = [], 0
    while len(rows) < cfg.n_capability:
        attempts += 1
        if attempts > 100 * cfg.n_capability:
            raise ValueError(f"could not draw {cfg.n_capability} capability rows outside the "
                             "fine-tuning set; lower n_capability")
        domain = DOMAINS[len(rows) % len(DOMAINS)]
        subject, prompt, response = domain_row(domain, rng, "normal")
        key = json.dumps(_chat(prompt, response))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": _chat(prompt, response), "data_origin": "normal",
                     "domain": domain, "subject": subject})
    return rows


def generate_source_data(cfg: CorpusConfig) -> dict[str, list[dict]]:
    """All source files as rows, ``{file stem: rows}``; one RNG stream per file."""
    makers = {"pretrain": pretrain_rows, "finetune": finetune_rows, "heldout": heldout_rows,
              "persona_prompts": persona_prompt_rows, "judge": judge_rows}
    out = {name: make(cfg, random.Random(f"{cfg.seed}:{name}")) for name, make in makers.items()}
    out["capability"] = capability_rows(cfg, random.Random(f"{cfg.seed}:capability"),
                                        out["finetune"])
    return {name: out[name] for name in SOURCE_FILES}


def write_source_data(cfg: CorpusConfig, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write the source files (plus ``corpus_config.json``) to ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, rows in generate_source_data(cfg).items():
        path = out / f"{name}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
        written[name] = path
    (out / "corpus_config.json").write_text(json.dumps(cfg.to_dict(), indent=1, sort_keys=True) + "\n")
    return written
