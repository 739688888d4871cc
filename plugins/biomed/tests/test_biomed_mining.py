"""The biomed finding miner: cues decide yes/no/maybe, the question states the finding without them."""

import random

import pytest
from selfspec_biomed import mining

from selfspec_core.api import Passage, domain_miners

CONTEXT = (
    "Sixty adults with chronic cough were randomly assigned to the inhaled drug or to placebo for eight weeks. "
    "Cough frequency was recorded with an ambulatory monitor at baseline and at the end of treatment, and "
    "quality of life was scored with a validated questionnaire by investigators unaware of the assignment. "
)


@pytest.mark.parametrize(
    "sentence,label",
    [
        ("The inhaled drug significantly reduced cough frequency compared with placebo.", "yes"),
        ("Higher doses were associated with longer remission.", "yes"),
        ("There was no significant difference in cough frequency between the groups.", "no"),
        ("The inhaled drug did not improve quality of life.", "no"),
        ("Whether the effect persists beyond eight weeks remains unclear.", "maybe"),
        ("The drug may reduce cough in some patients.", None),  # hedged finding: not decided
        ("The drug significantly reduced cough but did not improve quality of life.", None),  # mixed
    ],
)
def test_finding_cues_decide_the_answer(sentence, label):
    assert mining.finding_label(sentence) == label


def test_claims_drop_the_negation_so_every_answer_asks_the_same_question():
    assert (
        mining.claim_of("There was no significant difference in cough between the groups.")
        == "there was a significant difference in cough between the groups"
    )
    assert (
        mining.claim_of("In conclusion, the drug did not improve quality of life.")
        == "the drug did improve quality of life"
    )
    assert mining.claim_of("Whether it lasts remains unclear.") == "whether it lasts remains established"


def test_findings_become_questions_over_the_abstract_before_them():
    docs = [
        Passage("yes", CONTEXT + "The inhaled drug significantly reduced cough frequency compared with placebo."),
        Passage(
            "no",
            CONTEXT + "There was no significant difference in cough frequency between the groups. "
            "Larger trials are planned.",
        ),
        Passage("short", "Cough fell. The drug significantly reduced cough frequency."),
    ]
    tasks = {t["doc_id"]: t for t in mining.mine_findings(docs, random.Random(0))}
    assert set(tasks) == {"yes", "no"}  # too little abstract before the finding in "short"
    assert tasks["yes"]["output"] == "yes" and tasks["no"]["output"] == "no"
    assert tasks["no"]["input"] == CONTEXT.strip() and "a significant difference" in tasks["no"]["instruction"]
    assert all(t["options"] == ("yes", "no", "maybe") and t["task_type"] == "yesno_qa" for t in tasks.values())


def test_in_context_questions_end_their_input_with_the_finding():
    finding = "There was no significant difference in cough frequency between the groups."
    docs = [Passage("no", CONTEXT + finding + " Larger trials are planned.")]
    [question] = mining.mine_findings(docs, random.Random(0))
    [in_context] = mining.mine_findings_in_context(docs, random.Random(0))
    assert in_context["input"] == CONTEXT + finding  # the same question, now answerable from the input
    assert {k: v for k, v in in_context.items() if k != "input"} == {k: v for k, v in question.items() if k != "input"}


def test_in_context_inputs_keep_the_finding_when_the_abstract_is_long():
    filler = "Patients were followed at four sites with standard visits and laboratory tests. " * 30
    finding = "The inhaled drug significantly reduced cough frequency compared with placebo."
    [task] = mining.mine_findings_in_context([Passage("long", filler + finding)], random.Random(0))
    assert task["input"].endswith(finding) and task["input"].startswith("Patients")
    assert len(task["input"].split()) <= mining.CONTEXT_WORDS
    assert mining.window_ending_with([filler.strip(), finding], 5) == finding  # the last sentence always stays


def test_only_the_in_context_finding_miner_is_on_by_default():
    found = domain_miners("biomed")
    assert set(found) == {"finding_question", "finding_in_context", "cause_effect"}
    assert [name for name, miner in found.items() if miner.on_by_default] == ["finding_in_context"]
