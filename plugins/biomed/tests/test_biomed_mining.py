"""The biomed finding miner: cues decide yes/no/maybe, the question states the finding without them."""

import random

import pytest

from selfspec_biomed import mining
from selfspec_core.api import Passage, domain_miners

CONTEXT = ("Sixty adults with chronic cough were randomly assigned to the inhaled drug or to placebo for eight weeks. "
           "Cough frequency was recorded with an ambulatory monitor at baseline and at the end of treatment, and "
           "quality of life was scored with a validated questionnaire by investigators unaware of the assignment. ")


@pytest.mark.parametrize("sentence,label", [
    ("The inhaled drug significantly reduced cough frequency compared with placebo.", "yes"),
    ("Higher doses were associated with longer remission.", "yes"),
    ("There was no significant difference in cough frequency between the groups.", "no"),
    ("The inhaled drug did not improve quality of life.", "no"),
    ("Whether the effect persists beyond eight weeks remains unclear.", "maybe"),
    ("The drug may reduce cough in some patients.", None),  # hedged finding: not decided
    ("The drug significantly reduced cough but did not improve quality of life.", None),  # mixed
])
def test_finding_cues_decide_the_answer(sentence, label):
    assert mining.finding_label(sentence) == label


def test_claims_drop_the_negation_so_every_answer_asks_the_same_question():
    assert mining.claim_of("There was no significant difference in cough between the groups.") == \
        "there was a significant difference in cough between the groups"
    assert mining.claim_of("In conclusion, the drug did not improve quality of life.") == "the drug did improve quality of life"
    assert mining.claim_of("Whether it lasts remains unclear.") == "whether it lasts remains established"


def test_findings_become_questions_over_the_abstract_before_them():
    docs = [Passage("yes", CONTEXT + "The inhaled drug significantly reduced cough frequency compared with placebo."),
            Passage("no", CONTEXT + "There was no significant difference in cough frequency between the groups. "
                                    "Larger trials are planned."),
            Passage("short", "Cough fell. The drug significantly reduced cough frequency.")]
    tasks = {t["doc_id"]: t for t in mining.mine_findings(docs, random.Random(0))}
    assert set(tasks) == {"yes", "no"}  # too little abstract before the finding in "short"
    assert tasks["yes"]["output"] == "yes" and tasks["no"]["output"] == "no"
    assert tasks["no"]["input"] == CONTEXT.strip() and "a significant difference" in tasks["no"]["instruction"]
    assert all(t["options"] == ("yes", "no", "maybe") and t["task_type"] == "yesno_qa" for t in tasks.values())


def test_finding_miner_is_off_by_default_below_the_precision_bar():
    found = domain_miners("biomed")
    assert set(found) == {"finding_question", "cause_effect"}
    assert not any(miner.on_by_default for miner in found.values())
