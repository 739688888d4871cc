"""The request bodies ``selfspec serve`` accepts, as OpenAI's API names them.

Every parameter here does what OpenAI documents, or the request is refused with a 400 that names it:
an unknown parameter is never silently ignored (``extra="forbid"``), and the known ones this server
cannot honour (``tools`` and function calling) are declared only to refuse them with a clear message.
``user`` is accepted because it only labels the caller for OpenAI's own abuse monitoring.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

UNSUPPORTED_CHAT = ("tools", "tool_choice", "parallel_tool_calls", "functions", "function_call")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class Sampling(BaseModel):
    """What both endpoints share."""

    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias added to its logit, -100 to 100
    user: str | None = None

    @model_validator(mode="after")
    def _checked(self):
        for token, bias in (self.logit_bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias: keys are token ids (digits), not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: the bias of token {token} is {bias}; give -100 to 100")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    def stops(self) -> tuple[str, ...]:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return tuple(s for s in stop if s)

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=0)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, ... go to the chat template as they are
    role: str
    content: str | list[dict[str, Any]] | None = None


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _checked(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format: give json_schema with type 'json_schema' (and only then)")
        schema = self.schema_text()
        if schema is not None:
            from lmformatenforcer import JsonSchemaParser

            try:  # the grammar is built from the schema here, so a schema it cannot follow is a 400
                JsonSchemaParser(json.loads(schema))
            except Exception as exc:
                raise ValueError(f"response_format: this JSON schema cannot be enforced: {exc}") from None
        return self

    def schema_text(self) -> str | None:
        """The schema the answer must follow, as JSON text; None: free text."""
        if self.type == "text":
            return None
        schema = self.json_schema.json_schema if self.json_schema is not None else {}
        return json.dumps(schema or {"type": "object"}, sort_keys=True)


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # declared only to be refused with a clear message (see UNSUPPORTED_CHAT)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: Any = None

    @model_validator(mode="after")
    def _logprobs_checked(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: only allowed with logprobs=true")
        return self

    def unsupported(self) -> list[str]:
        return [name for name in UNSUPPORTED_CHAT if getattr(self, name) is not None]


def supported(model: type[BaseModel]) -> list[str]:
    """The parameter names ``model`` accepts, for the message that refuses an unknown one."""
    return sorted(set(model.model_fields) - set(UNSUPPORTED_CHAT))
