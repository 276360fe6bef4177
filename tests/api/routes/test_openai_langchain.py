"""LangChain's ChatOpenAI, as users' programs use it, against a running Zeus (the real server in
a subprocess): invoke, stream, and structured output (refused by name on the built-in engine)."""

from __future__ import annotations

import httpx
import openai
import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.support.live_server import LiveServer


@pytest.fixture
def chat_model(live_server: LiveServer) -> ChatOpenAI:
    model = httpx.get(
        f"{live_server.base_url}/api/v1/models",
        headers={"Authorization": f"Bearer {live_server.analyst.api_key}"},
    ).json()["data"][0]["id"]
    return ChatOpenAI(
        model=model,
        base_url=f"{live_server.base_url}/api/v1",
        api_key=live_server.analyst.api_key,
        max_tokens=12,
        temperature=0,
        max_retries=0,
    )


def test_invoke(chat_model: ChatOpenAI) -> None:
    reply = chat_model.invoke([SystemMessage("Be brief."), HumanMessage("What is 2 plus 2?")])
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    assert reply.usage_metadata["output_tokens"] <= 12 and reply.usage_metadata["input_tokens"] > 0
    # Greedy: the same question, the same answer.
    assert (
        chat_model.invoke([SystemMessage("Be brief."), HumanMessage("What is 2 plus 2?")]).content
        == reply.content
    )


async def test_stream(chat_model: ChatOpenAI) -> None:
    chunks = [chunk async for chunk in chat_model.bind(stream_options={"include_usage": True}).astream("Hi")]
    text = "".join(chunk.content for chunk in chunks)
    assert len(chunks) > 2 and text
    assert text == (await chat_model.ainvoke("Hi")).content
    usage = [chunk.usage_metadata for chunk in chunks if chunk.usage_metadata]
    assert usage and usage[-1]["output_tokens"] > 0


class Answer(BaseModel):
    value: int


def test_structured_output_is_refused_by_name_on_the_builtin_engine(chat_model: ChatOpenAI) -> None:
    for method in ("json_schema", "json_mode", "function_calling"):
        with pytest.raises(openai.BadRequestError) as refused:
            chat_model.with_structured_output(Answer, method=method).invoke("What is 2 plus 2?")
        assert refused.value.body["param"] in ("response_format", "tools"), method
        assert "vllm" in refused.value.message
