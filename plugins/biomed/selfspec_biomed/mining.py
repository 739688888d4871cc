"""Biomedical tasks mined from the corpus's abstracts, each answer decided by the abstract's own words.

``finding_question`` is PubMedQA's form: an abstract's finding (one of its last sentences) becomes a
yes/no/maybe question, and the rest of the abstract before it the input. The finding's own cues
decide the answer: a positive result ("significantly reduced", "was associated with") -> yes; a
negated one ("no significant difference", "did not improve") -> no; an open one ("remains
unclear", "inconclusive") -> maybe. The question states the finding with its negation or hedge
taken out, so all three answers ask the same kind of question. Sentences with mixed cues are left
alone; labels are balanced when the stage samples them.

``finding_in_context`` asks the same question with the finding kept at the end of the input
(reading comprehension, as AdaptLLM poses it): the answer is in the text the model reads, so the
model learns to read a finding's cues instead of a label share, which is what moves PubMedQA.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from selfspec_core.api import Miner, Passage, pick_phrasing, sentences

LABELS = ("yes", "no", "maybe")
FINDING_SENTENCES = 3  # a finding is looked for among an abstract's last sentences
MIN_CONTEXT_WORDS = 40
CONTEXT_WORDS = 100  # the finding and the sentences just before it (see MINERS)

NEGATED = re.compile(
    r"\b(?:no (?:statistically )?significant (?:difference|change|effect|association|correlation|relationship|"
    r"improvement|benefit|increase|reduction|decrease)s?|(?:was|were|is|are) not (?:significantly )?"
    r"(?:associated|correlated|related|different|effective|superior|predictive|improved|reduced|increased)|"
    r"(?:did|does|do) not (?:significantly )?"
    r"(?:improve|reduce|increase|decrease|affect|differ|change|predict|influence|alter|prevent|correlate|show|lead|result|"
    r"support|provide|confer)|no (?:evidence|association|effect|benefit|advantage|improvement|correlation|"
    r"relationship|difference)s? (?:of|for|between|in|on|with|was|were)|"
    r"failed to (?:show|demonstrate|improve|reduce|detect|find))\b",
    re.I,
)
OPEN = re.compile(
    r"\b(?:remains? (?:unclear|uncertain|controversial|unknown|to be (?:determined|established|elucidated|"
    r"clarified))|(?:is|are) (?:still )?(?:unclear|uncertain|inconclusive|controversial)|inconclusive|"
    r"may or may not)\b",
    re.I,
)
POSITIVE = re.compile(
    r"\b(?:significantly (?:improved|increased|reduced|decreased|higher|lower|better|associated|correlated|"
    r"greater|shorter|longer|more|less|enhanced|predicted)|(?:was|were|is|are) (?:significantly |"
    r"independently |strongly |positively |negatively )?(?:associated|correlated) with|(?:is|was|are|were)"
    r" (?:an? )?(?:safe|effective|feasible|useful|reliable|accurate|valid|superior)|(?:improves|reduces|"
    r"increases|predicts|prevents) )",
    re.I,
)
ANY_NEGATION = re.compile(r"\b(?:no|not|neither|nor|without|never|unlikely|fail\w*|lack\w*|little)\b", re.I)
HEDGE = re.compile(r"\b(?:may|might|could|possibly|perhaps|unclear|uncertain)\b", re.I)

# Negation taken out of a finding, so the question asks the positive claim whatever the answer.
_UNNEGATE = (
    (re.compile(r"\bno (statistically )?significant\b", re.I), r"a \1significant"),
    (re.compile(r"\b(was|were|is|are) not\b", re.I), r"\1"),
    (re.compile(r"\b(did|does|do) not\b", re.I), r"\1"),
    (
        re.compile(
            r"\bno (evidence|association|effect|benefit|advantage|improvement|correlation|relationship|difference)",
            re.I,
        ),
        r"an \1",
    ),
    (re.compile(r"\bfailed to\b", re.I), "managed to"),
    (
        re.compile(r"\b(remains?|is|are) (?:still )?(?:unclear|uncertain|inconclusive|controversial|unknown)\b", re.I),
        r"\1 established",
    ),
    (re.compile(r"\bremains? to be (?:determined|established|elucidated|clarified)\b", re.I), "is established"),
    (re.compile(r"\ban (evidence|advantage|improvement)", re.I), r"\1"),
)
QUESTION_PHRASINGS = (
    "Question: Does the study find that {claim}? Answer yes, no, or maybe from the abstract.",
    "Based on this abstract, is it shown that {claim}? Reply yes, no or maybe.",
    "Read the abstract. Did the authors find that {claim}? Answer with yes, no, or maybe.",
    "From the study described, can one conclude that {claim}? Options: yes, no, maybe.",
)


def finding_label(sentence: str) -> str | None:
    """yes / no / maybe when the sentence's cues decide it unambiguously, else ``None``."""
    negated, open_, positive = NEGATED.search(sentence), OPEN.search(sentence), POSITIVE.search(sentence)
    if open_ and not negated and not positive:
        return "maybe"
    if (
        negated
        and not positive
        and not open_
        and len(ANY_NEGATION.findall(sentence)) == 1
        and not HEDGE.search(sentence)
    ):
        return "no"
    if positive and not ANY_NEGATION.search(sentence) and not open_ and not HEDGE.search(sentence):
        return "yes"
    return None


def claim_of(sentence: str) -> str:
    """The finding as a positive claim: negation and openness taken out, lead-in and full stop dropped."""
    claim = sentence.strip().rstrip(".")
    for pattern, replacement in _UNNEGATE:
        claim = pattern.sub(replacement, claim)
    claim = re.sub(
        r"^(?:in conclusion|in summary|overall|thus|therefore|conclusions?|results?)[,:]?\s+", "", claim, flags=re.I
    )
    claim = re.sub(
        r"^(?:we (?:found|conclude|observed|showed) that|this study (?:shows|showed|demonstrates) that)\s+",
        "",
        claim,
        flags=re.I,
    )
    return claim[:1].lower() + claim[1:] if claim[1:2].islower() else claim


def _findings(docs: Sequence[Passage]):
    """(doc, its sentences, the finding's position, label): each abstract's first decided finding
    among its last sentences with enough abstract before it."""
    for doc in docs:
        parts = sentences(doc.text)
        for position in range(max(1, len(parts) - FINDING_SENTENCES), len(parts)):
            label = finding_label(parts[position])
            if label is not None and len(" ".join(parts[:position]).split()) >= MIN_CONTEXT_WORDS:
                yield doc, parts, position, label
                break


def _question(rng: random.Random, doc: Passage, finding: str, label: str, context: str) -> dict:
    return {
        "instruction": pick_phrasing(rng, QUESTION_PHRASINGS, claim=claim_of(finding)),
        "input": context,
        "output": label,
        "label": label,
        "options": LABELS,
        "task_type": "yesno_qa",
        "doc_id": doc.id,
    }


def mine_findings(docs: Sequence[Passage], rng: random.Random) -> list[dict]:
    """PubMedQA's form: the question states the finding, the input is the abstract before it."""
    return [
        _question(rng, doc, parts[position], label, " ".join(parts[:position]))
        for doc, parts, position, label in _findings(docs)
    ]


def window_ending_with(parts: Sequence[str], max_words: int) -> str:
    """The last sentences of ``parts`` that fit in ``max_words`` words (the last one always)."""
    kept: list[str] = []
    words = 0
    for part in reversed(parts):
        words += len(part.split())
        if kept and words > max_words:
            break
        kept.append(part)
    return " ".join(reversed(kept))


def mine_findings_in_context(docs: Sequence[Passage], rng: random.Random) -> list[dict]:
    """Reading comprehension: the same question, the input the abstract up to and with the finding.

    The input ends with the finding and stays under ``CONTEXT_WORDS``: the sentences that decide the
    answer, about 130 tokens, so no training example loses its finding to ``train.max_length`` (at 200
    words a third did) and training reads 40% fewer tokens. On PubMedQA dev (300, seed 42, the quick
    profile of 150 written and 297 mined records, one pass in batches of 4) the tuned model scored
    0.530 -> 0.557, macro-F1 0.289 -> 0.365 [+0.026, +0.129]; the adapter of 200-word inputs and two
    passes in batches of 8 scored 0.510, 0.345 there (paired: +0.047 [+0.017, +0.080] accuracy,
    +0.020 [-0.001, +0.043] macro-F1 for the shorter inputs). See also ``MINERS``.
    """
    return [
        _question(rng, doc, parts[position], label, window_ending_with(parts[: position + 1], CONTEXT_WORDS))
        for doc, parts, position, label in _findings(docs)
    ]


# finding_question's registered precision is the labeller's agreement with PubMedQA dev's gold answers
# (`python bench/miners.py`): its input leaves the finding out, so the question must be answered from
# the rest of the abstract, as PubMedQA's are, and PubMedQA's gold is the fair truth. Below 0.9, so off
# by default. Its data made the model answer "no" more often, not read findings better: a quick run
# with it on (150 mined, 150 generated), on PubMedQA dev (300): accuracy 0.540 -> 0.523 (-0.017
# [-0.057, +0.023]), macro-F1 +0.085 [+0.042, +0.134], and the tuned model's no-minus-yes margin ranks
# gold "no" above gold "yes" at AUC 0.50 (the base: 0.575).
# finding_in_context's input holds the finding, so its truth is the finding's label: 0.95 on 60
# hand-judged tasks (bench/data/finding_question_judged.jsonl, the same findings and labels). On
# PubMedQA dev (300, seed 0; beside ~140 generated records; base 0.550, macro-F1 0.237, AUC 0.571):
# 300 records, 0.550 -> 0.550, macro-F1 0.312 [+0.037, +0.113 of the difference], AUC 0.583; 450,
# 0.563, macro-F1 0.384, AUC 0.609; 300 with 120-word inputs (the finding kept), 0.527, 0.342,
# AUC 0.587 (4 of 441 examples cut). Unlike its PubMedQA-form twin, reading the finding teaches the cue.
# Its labels are drawn by the square roots of the corpus's counts (yes 574, no 322, maybe 27 found:
# 156 / 117 / 27 of 300), not balanced: published findings are mostly positive, and so are a biomedical
# benchmark's answers. On PubMedQA dev (same 300 records otherwise): balanced 0.550, macro-F1 0.312,
# AUC 0.583; square roots 0.560, 0.331, 0.585; as found (187 / 105 / 8) 0.557, 0.355, 0.587. All within
# noise of each other; square roots for the best accuracy without following an extreme corpus all the way.
MINERS = [
    Miner(
        "finding_question",
        mine_findings,
        precision=0.560,
        description="yes/no/maybe question from an abstract's finding, answered by its cues",
    ),
    Miner(
        "finding_in_context",
        mine_findings_in_context,
        precision=0.950,
        label_prior=0.5,
        description="the finding question with the finding kept at the end of the input (reading comprehension)",
    ),
]
