"""The form the specialized model is prompted in: its base model's chat template, or the Alpaca form.

A skill learnt in one prompt form stays there, so one renderer serves every place that prompts the
model: training (prompt and target), evaluation, the chat endpoint of ``selfspec serve`` and the
``tokenizer.chat_template`` a GGUF export carries for llama.cpp and Ollama.

* ``chat``: the record as one user message (the instruction, a blank line, the input), rendered by
  the tokenizer's chat template with the generation prompt: exactly what a chat client sends. The
  training target is what the template renders for the assistant turn, its end-of-turn marker included.
* ``alpaca``: the domain's ``train`` :class:`~selfspec_core.templates.PromptTemplate` (by default
  Alpaca's ``### Instruction: ... ### Response:``); the target is the output and the EOS token.

Rendered text keeps a chat template's special tokens (BOS, turn markers) as text: the generators
tokenize prompts without adding special tokens, so the text is the whole prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from selfspec_core.errors import SelfspecError
from selfspec_core.templates import PromptTemplate

PROMPT_FORMATS = ("chat", "alpaca")
# Stands for a user message's text while an Alpaca prompt is cut into the text around it.
_CONTENT = "\x00content\x00"


class ConversationError(SelfspecError):
    """A conversation the prompt format cannot render (a chat request answers it with HTTP 400)."""


def user_message(record: Mapping) -> str:
    """A record's instruction and input as one message, as a person would type them."""
    text_input = str(record.get("input") or "").strip()
    return f"{record['instruction']}\n\n{text_input}" if text_input else str(record["instruction"])


@dataclass(frozen=True)
class PromptFormat:
    """Renders records (``instruction``, ``input``, ``output``) and conversations in one prompt format.

    ``template`` and ``context`` give the Alpaca form (the domain's train template and its fields);
    ``tokenizer`` the chat form, and training's tokens in both.
    """

    name: str
    template: PromptTemplate
    tokenizer: Any = None
    context: Mapping = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in PROMPT_FORMATS:
            raise SelfspecError(f"unknown prompt format {self.name!r}: choose one of {', '.join(PROMPT_FORMATS)}")
        if self.name == "chat" and not has_chat_template(self.tokenizer):
            raise SelfspecError(
                f"prompt format 'chat': the model's tokenizer "
                f"({getattr(self.tokenizer, 'name_or_path', None) or 'none loaded'}) has no chat template; "
                'use prompt_format = "alpaca" (or "auto", which picks it for such models)'
            )

    @classmethod
    def chosen(cls, setting: str, template: PromptTemplate, tokenizer, context: Mapping | None = None):
        """The format ``train.prompt_format`` names; ``auto`` is chat when the tokenizer has a chat template."""
        if setting == "auto":
            setting = "chat" if has_chat_template(tokenizer) else "alpaca"
        return cls(setting, template, tokenizer, dict(context or {}))

    @property
    def joiner(self) -> str:
        """Between an answered Alpaca prompt and the next one (demonstrations, earlier turns)."""
        return self.template.separator or "\n\n"

    # ------------------------------------------------------------------------------------ records

    def prompt(self, record: Mapping, demos: Sequence[Mapping] = ()) -> str:
        """The text the model continues with ``record``'s answer, after ``demos`` answered the same way."""
        if self.name == "chat":
            turns = []
            for demo in demos:
                turns += [_turn("user", user_message(demo)), _turn("assistant", str(demo["output"]))]
            return self._chat([*turns, _turn("user", user_message(record))])
        shots = [self._ask(demo) + str(demo["output"]) for demo in demos]
        return self.joiner.join([*shots, self._ask(record)])

    def completion(self, record: Mapping) -> str:
        """What training puts after the prompt: the output and the end of the model's turn (the
        template's end-of-turn text; in the Alpaca form the EOS token)."""
        if self.name == "alpaca":
            return str(record["output"]) + str(self.tokenizer.eos_token)
        asked = [_turn("user", user_message(record))]
        prompt = self._chat(asked)
        full = self._chat([*asked, _turn("assistant", str(record["output"]))], generation_prompt=False)
        if not full.startswith(prompt):
            raise SelfspecError(
                "prompt format 'chat': this chat template renders an answered conversation differently from "
                "its generation prompt, so the answer cannot be trained as a continuation of the prompt; "
                'set train.prompt_format = "alpaca"'
            )
        return full[len(prompt) :]

    def response_ids(self, record: Mapping) -> list[int]:
        """The tokens training learns after the prompt (the Alpaca form appends the EOS id itself: not
        every tokenizer splits its EOS text back into that one token)."""
        if self.name == "alpaca":
            return self._tokens(str(record["output"])) + [self.tokenizer.eos_token_id]
        return self._tokens(self.completion(record))

    def _ask(self, record: Mapping) -> str:
        fields = {"instruction": record["instruction"], "input": record.get("input") or ""}
        return self.template.render([], fields, **self.context)

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------------------ conversations

    def conversation(self, messages: Sequence[Mapping]) -> str:
        """A chat request's prompt. ``chat``: the tokenizer's template. ``alpaca``: each user message is
        an instruction (empty input) in the Alpaca prompt, each assistant message follows its prompt as
        the answer (as demonstrations do), system messages' text comes first where it stands, followed
        by a blank line; the last message must be the user's, and no user message may be empty.
        :meth:`chat_template` renders the same text."""
        if self.name == "chat":
            try:
                return self._chat([dict(message) for message in messages])
            except Exception as exc:  # a template's own raise_exception, or a Jinja error
                raise ConversationError(
                    f"messages do not fit the model's chat template: {type(exc).__name__}: {exc}"
                ) from exc
        if not messages or messages[-1]["role"] != "user":
            raise ConversationError(
                "this model was tuned on single instructions (the Alpaca form): end the messages with a user message"
            )
        parts = []
        for message in messages:
            role, content = message["role"], str(message["content"])
            if role == "system":
                parts.append(content + "\n\n")
            elif role == "user":
                if not content.strip():
                    raise ConversationError("a user message is empty")
                parts.append(self._ask({"instruction": content}))
            elif role == "assistant":
                parts.append(content + self.joiner)
            else:
                raise ConversationError(
                    f"role {role!r} is not supported by a model tuned on the Alpaca form (system, user, assistant)"
                )
        return "".join(parts)

    def chat_template(self) -> str:
        """A Jinja chat template (Hugging Face's ``messages`` convention, as llama.cpp and Ollama apply
        it) that renders :meth:`conversation`'s text: the base template for ``chat``, else one made
        from the Alpaca prompt with the user message's text in place of the instruction."""
        if self.name == "chat":
            return self.tokenizer.get_chat_template()
        around = self._ask({"instruction": _CONTENT}).split(_CONTENT)
        user = " + message['content'] + ".join(_jinja_text(part) for part in around)
        return (
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{{ message['content'] + " + _jinja_text("\n\n") + " }}"
            "{%- elif message['role'] == 'user' -%}{{ " + user + " }}"
            "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + " + _jinja_text(self.joiner) + " }}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )

    def _chat(self, messages: list[dict], generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _jinja_text(text: str) -> str:
    """``text`` as a Jinja string literal (JSON's escapes are Jinja's; non-ASCII stays as it is)."""
    return json.dumps(text, ensure_ascii=False)
