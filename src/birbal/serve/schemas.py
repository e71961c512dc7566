"""The challenge API's request and response bodies (`challenge_open_api_spec.json` plus what HELM sends).

The spec's field names, types and defaults are kept exactly (tests/test_serve_schemas.py checks them against
the spec file). What the spec leaves open is bounded here so that a wrong or absurd value is a 422 naming the
field and the limit, never a 500: limits that depend on the deployment (the context length, the largest
`max_new_tokens`) are checked by the engine against `serve.*`; the ones below are fixed sanity bounds.

Unknown request fields are ignored rather than rejected: HELM versions add fields (`top_p`, `stop_sequences`,
`top_k_per_token`, ...) and an evaluation must not fail because the client is newer than the server.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Sanity bounds: far above anything HELM sends, low enough that no value makes the server misbehave.
MAX_NUM_SAMPLES = 16
MAX_NEW_TOKENS_ABSOLUTE = 1_000_000  # the deployment limit (serve.max_new_tokens_limit) is checked later
MAX_TOP_K_PER_TOKEN = 100
MAX_STOP_SEQUENCES = 16
MAX_STOP_SEQUENCE_CHARS = 256
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**63 - 1
MAX_TOKENIZE_LENGTH = 1_000_000
MAX_TOKEN_ID = 2**31 - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ProcessRequest(_Request):
    """POST /process. Defaults are the challenge's (`max_new_tokens=50, top_k=200, temperature=0.8`)."""

    prompt: str = Field(min_length=1, description="The text to continue; must not be empty.")
    num_samples: int = Field(
        1, ge=1, le=MAX_NUM_SAMPLES,
        validation_alias=AliasChoices("num_samples", "num_return_sequences"),
        description="Completions asked for (HELM sends `num_return_sequences`). The response holds one "
                    "completion, as the challenge's response schema has room for one only.")
    max_new_tokens: int = Field(50, ge=0, le=MAX_NEW_TOKENS_ABSOLUTE,
                                description="New tokens at most; 0 with echo_prompt scores the prompt only.")
    top_k: int = Field(200, ge=0, le=1_000_000, description="Sampling: keep the k most likely tokens (0: all).")
    temperature: float = Field(0.8, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description="At or below 1e-5 means greedy (HELM sends 1e-7 for 0).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False,
                         description="Sampling: nucleus mass kept (1: all).")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="Same seed, same sampled output.")
    echo_prompt: bool = Field(False, description="Return the prompt's tokens (with logprobs) before the output.")
    stop_sequences: list[Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_SEQUENCE_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_SEQUENCES,
        description="Generation ends at the first of these; it is cut from the text.")
    top_k_per_token: int = Field(1, ge=1, le=MAX_TOP_K_PER_TOKEN,
                                 description="How many most likely tokens each token's top_logprob holds.")

    @field_validator("top_p", "echo_prompt", "stop_sequences", "top_k_per_token", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        # HELM's Request dataclass may carry None for an option it does not use; None means "the default".
        if value is None:
            return {"top_p": 1.0, "echo_prompt": False, "stop_sequences": [], "top_k_per_token": 1}[info.field_name]
        return value


class Token(BaseModel):
    text: str
    logprob: float
    top_logprob: dict[str, float]


class ProcessResponse(BaseModel):
    text: str
    tokens: list[Token]
    logprob: float
    request_time: float


class TokenizeRequest(_Request):
    text: str
    truncation: bool = True
    max_length: int = Field(2048, ge=1, le=MAX_TOKENIZE_LENGTH)

    @field_validator("text")
    @classmethod
    def _valid_unicode(cls, value: str) -> str:
        # A lone surrogate (JSON "\ud800") is no text the tokenizer can encode; /process's prompt is refused the
        # same way by pydantic's own string check.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"must be valid Unicode: a lone surrogate at position {err.start}") from None
        return value


class TokenizeResponse(BaseModel):
    tokens: list[int]
    request_time: float


class DecodeRequest(_Request):
    tokens: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] = Field(max_length=MAX_TOKENIZE_LENGTH)


class DecodeResponse(BaseModel):
    text: str
    request_time: float


class ErrorResponse(BaseModel):
    """Every error body: a message naming the field, the limit and the value, and a stable type."""

    error: str
    error_type: str
