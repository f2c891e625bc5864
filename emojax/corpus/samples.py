"""Prompt/response samples, the input of `emojax screen` and of fine-tuning: JSONL, CSV or Parquet rows.

A row is plain, {"prompt": str, "response": str}, or chat, {"messages": [{"role": ..., "content": ...}, ...]}
whose last message is the assistant's response and the ones before it the prompt. A plain row is read as written:
the prompt's text, then the response's. A chat row is rendered with the model's chat template, or the study's
Human/Assistant frame (emojax.tokenizer.chat_prompt), the response being the assistant turn's text. An optional
`id` field names the sample (default "<file name>:<row>").

Unlike the corpus stage, which sets bad rows aside and counts them, a sample file with a bad row is refused as a
whole, naming the file and the row: screening or fine-tuning on part of a file without saying so is silent
data loss. Sample ids must be unique across the files given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from emojax.corpus.readers import ReaderSpec, file_format, read_rows
from emojax.errors import InputError
from emojax.tokenizer import Tokenizer, chat_prompt

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Sample:
    sample_id: str
    response: str
    prompt: str = ""  # plain rows
    messages: tuple[dict, ...] = ()  # chat rows: the prompt's turns (the response excluded)
    where: str = ""  # "<file>, line 3": for errors

    def prompt_text(self, tokenizer: Tokenizer) -> str:
        """The text the model reads before the response (a chat prompt ends with the assistant's opener)."""
        return chat_prompt(list(self.messages), tokenizer) if self.messages else self.prompt

    def token_ids(self, tokenizer: Tokenizer) -> tuple[list[int], int]:
        """(prompt ids + response ids, number of prompt ids). The two parts are encoded apart, so the response's
        tokens are exactly those that follow the prompt's, whatever the tokenizer merges across the boundary."""
        if self.messages:
            prompt = self.prompt_text(tokenizer)
            full = chat_prompt([*self.messages, {"role": "assistant", "content": self.response}], tokenizer)
            prompt_ids = tokenizer.encode_prompt(prompt)
            response_ids = tokenizer.encode(full[len(prompt):], add_special_tokens=False)
        else:
            prompt_ids = tokenizer.encode(self.prompt)
            response_ids = tokenizer.encode(self.response, add_special_tokens=False)
        return prompt_ids + response_ids, len(prompt_ids)


def read_samples(paths: Sequence[str | Path]) -> list[Sample]:
    """Every sample of `paths`, in file order then row order. Raises InputError naming the file and row of the
    first bad row (unreadable, missing fields, wrong types, an empty response, a repeated id)."""
    samples: list[Sample] = []
    seen: dict[str, str] = {}
    for path in map(str, paths):
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read the sample file ({e.strerror or e})") from None
        for location, default_id, row, error in read_rows(path, data, file_format(path, ReaderSpec())):
            where = f"{path}, {location}"
            if error is not None:
                raise InputError(f"{where}: {error}")
            sample = _sample(row, default_id, where)
            if sample.sample_id in seen:
                raise InputError(f"{where}: id {sample.sample_id!r} repeats {seen[sample.sample_id]}")
            seen[sample.sample_id] = where
            samples.append(sample)
    if not samples:
        raise InputError(f"no samples in {', '.join(map(str, paths)) or 'the (empty) list of files'}")
    return samples


def _sample(row: dict, default_id: str, where: str) -> Sample:
    sample_id = str(row["id"]) if row.get("id") not in (None, "") else default_id
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise InputError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        for k, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
                raise InputError(f"{where}: messages[{k}] must be {{role: {'|'.join(ROLES)}, content: text}}")
        if messages[-1]["role"] != "assistant":
            raise InputError(f"{where}: the last message must be the assistant's response, "
                             f"got role {messages[-1]['role']!r}")
        if len(messages) < 2:
            raise InputError(f"{where}: 'messages' holds only the response; a prompt turn must come before it")
        sample = Sample(sample_id, messages[-1]["content"], messages=tuple(messages[:-1]), where=where)
    elif "prompt" in row and "response" in row:
        for key in ("prompt", "response"):
            if not isinstance(row[key], str):
                raise InputError(f"{where}: {key!r} must be text, got {type(row[key]).__name__}")
        sample = Sample(sample_id, row["response"], prompt=row["prompt"], where=where)
    else:
        raise InputError(f"{where}: a sample needs 'prompt' and 'response', or 'messages' "
                         f"(found {sorted(row)})")
    if not sample.response.strip():
        raise InputError(f"{where}: the response is empty")
    return sample
