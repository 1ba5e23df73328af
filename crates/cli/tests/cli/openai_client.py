"""The official openai client against `pinion serve`: python3 openai_client.py BASE_URL MODEL_ID.

Prints "ok" when every check passes; an assertion or an unexpected exception fails the run.
"""

import sys

import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=300)

ids = [m.id for m in client.models.list().data]
assert ids == [model], ids

messages = [{"role": "user", "content": "What is two plus two?"}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
choice = whole.choices[0]
assert choice.message.role == "assistant" and choice.message.content, whole
assert choice.finish_reason in ("stop", "length"), whole
assert 0 < whole.usage.completion_tokens <= 24 and whole.usage.prompt_tokens > 0, whole.usage
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

parts, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        parts.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage:
        usage = chunk.usage
assert "".join(parts) == choice.message.content, (parts, choice.message.content)
assert finish == choice.finish_reason and usage.completion_tokens == whole.usage.completion_tokens

done = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0)
assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 10, done
streamed = "".join(
    c.choices[0].text
    for c in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True
    )
    if c.choices
)
assert streamed == done.choices[0].text, (streamed, done.choices[0].text)

# Sampling with a seed is reproducible; another seed may differ but still gives text.
seeded = [
    client.completions.create(
        model=model, prompt="My favourite colour is", max_tokens=12, temperature=1.0, top_p=0.9, seed=42
    ).choices[0].text
    for _ in range(2)
]
assert seeded[0] == seeded[1], seeded

stopped = client.completions.create(model=model, prompt="Once upon a time", max_tokens=10, temperature=0, stop=[" "])
assert stopped.choices[0].finish_reason == "stop" and " " not in stopped.choices[0].text, stopped


def refused(kind, **kwargs):
    try:
        client.chat.completions.create(**kwargs)
    except kind as e:
        return e
    raise AssertionError(f"{kwargs} was accepted")


e = refused(openai.BadRequestError, model=model, messages=messages, n=2)
assert e.status_code == 400 and "n" == e.body.get("param"), e.body
e = refused(openai.NotFoundError, model="gpt-4o", messages=messages)
assert e.status_code == 404, e
e = refused(openai.BadRequestError, model=model, messages=messages, max_tokens=0)
assert "max_tokens" in str(e), e
e = refused(openai.BadRequestError, model=model, messages=messages, logprobs=True)
assert "logprobs" in str(e), e
print("ok")
