"""Few-shot completion prompts.

Small models follow a plain few-shot completion prompt far better than a chat-formatted request
(asked in chat form to write a question, SmolLM2-135M answers "Yes"), so every stage's prompt is a
header, a list of demonstrations and one query, joined by a separator the model learns to stop at.

Placeholders are ``str.format`` fields: ``{instruction}``, ``{input}``, ``{output}``,
``{task_type}``, ``{passages}``, ``{domain}``, ``{description}``. Text inside ``[[ ... ]]`` is
optional: it is left out when every placeholder in it renders empty (e.g. an empty input).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

OPTIONAL = re.compile(r"\[\[(.*?)\]\]", re.S)
FORMATTER = string.Formatter()


def fill(text: str, fields: dict) -> str:
    """Format ``text`` with ``fields``, dropping optional ``[[...]]`` parts whose fields are empty."""

    def optional(match: re.Match) -> str:
        part = match.group(1)
        names = [name for _, name, _, _ in FORMATTER.parse(part) if name]
        if names and not any(str(fields.get(name, "")).strip() for name in names):
            return ""
        return part

    return OPTIONAL.sub(optional, text).format_map(_Fields(fields))


class _Fields(dict):
    """Missing fields render empty, so a template may use fields a stage does not provide."""

    def __missing__(self, key):
        return ""


@dataclass(frozen=True)
class PromptTemplate:
    """A few-shot prompt: ``header``, demonstrations in ``example`` form, then ``query``."""

    example: str
    query: str
    header: str = ""
    separator: str = "\n\n###\n\n"

    def render(self, examples: list[dict], query: dict, **context) -> str:
        parts = [fill(self.header, context)] if self.header else []
        parts += [fill(self.example, {**context, **example}) for example in examples]
        parts.append(fill(self.query, {**context, **query}))
        return self.separator.join(parts)

    @property
    def stop(self) -> list[str]:
        """Where a completion ends: at the start of the next separator."""
        marker = self.separator.strip()
        return ["\n" + marker] if marker else []


def field_labels(text: str) -> list[str]:
    """The ``Label:`` words that start lines of a template text, in order (``Type:``, ``Instruction:``, ``Input:``).

    Where a stage's completion must stop: a line starting one of them begins a new field.
    """
    literal = "".join(part for part, _, _, _ in FORMATTER.parse(OPTIONAL.sub(r"\1", text)))
    return list(dict.fromkeys(re.findall(r"(?m)^[ \t]*([A-Za-z][\w -]{0,30}:)", literal)))


def template_context(domain: str, description: str = "") -> dict[str, str]:
    """What a domain's templates are filled with: its name and description (the name where it has none)."""
    return {"domain": domain, "description": description or domain}
