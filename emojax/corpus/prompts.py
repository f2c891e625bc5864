"""Generation prompts for a model-written corpus, and the reader that takes the model's answers back.

The study's corpus was written by a large model: per emotion and topic, short stories in which a character
feels the emotion without it being named. `write_prompts` emits one JSONL prompt per (emotion, topic) so any
LLM can write that corpus; `collect_responses` turns the answers (JSONL with the prompt id and the model's
text) into a labelled JSONL corpus that `emojax corpus build --input` reads, keeping only stories that pass
the same validator as the built-in generator and reporting the rest.

Both write their file atomically (emojax.fileio): a collect that fails half-way leaves its previous output as it
was. A prompt id answered twice would give two stories one doc id: the later answer is rejected with a reason.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from emojax.corpus.catalogue import load_catalogue
from emojax.corpus.readers import CorpusError
from emojax.errors import ConfigError
from emojax.fileio import write_text

INSTRUCTIONS = """Write {n} different short stories, each a single paragraph of 80 to 200 words, about {topic}.
In every story one character experiences the emotion "{emotion}". Never use the word "{emotion}", any form of it,
or a direct synonym: let the reader infer the emotion from what the character does, their body language,
what they say and what they think. Write some stories in the first person and some in the third person, vary
the names, places and situations, and do not add titles or commentary. Separate the stories with a line
containing only ###."""


def prompts(stories_per_prompt: int = 12, concepts: Sequence[str] = (), n_topics: int | None = None) -> Iterator[dict]:
    catalogue = load_catalogue()
    chosen = [catalogue.concept(c) for c in concepts] if concepts else catalogue.concepts
    for concept in chosen:
        for t, topic in enumerate(catalogue.topics[:n_topics]):
            yield {
                "id": f"{concept.name}|{t:03d}", "emotion": concept.name, "topic": topic.topic,
                "n": stories_per_prompt,
                "prompt": INSTRUCTIONS.format(n=stories_per_prompt, topic=topic.topic, emotion=concept.name),
            }


def write_prompts(out: str | Path, **kwargs) -> int:
    lines = [json.dumps(p) + "\n" for p in prompts(**kwargs)]
    write_text(out, "".join(lines))
    return len(lines)


_SEPARATOR = re.compile(r"^\s*#{3,}\s*$", re.MULTILINE)


def collect_responses(responses: str | Path, out: str | Path, text_field: str = "response") -> dict:
    """Reads {"id": prompt id, "<text_field>": model text} lines; writes {"doc_id","text","label","topic"}
    lines for every story that passes validation. Returns counts, with the rejected stories and reasons."""
    from emojax.corpus.generator import validate_story

    catalogue = load_catalogue()
    rejected: list[dict] = []
    try:
        lines = Path(responses).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise CorpusError(f"{responses}: cannot read ({e})") from None
    rows: list[str] = []
    first_line: dict[str, int] = {}  # prompt id -> the line of its first answer
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            emotion, topic_index = row["id"].split("|")
            concept = catalogue.concept(emotion)
            topic = catalogue.topics[int(topic_index)].topic
            text = row[text_field]
        except (json.JSONDecodeError, KeyError, ValueError, IndexError, AttributeError, TypeError,
                ConfigError) as e:  # ConfigError: an emotion the catalogue does not have
            rejected.append({"line": i, "reason": f"not a response to an emojax prompt ({e})"})
            continue
        if text is not None and not isinstance(text, str):
            rejected.append({"line": i, "reason": f"{text_field!r} is not text"})
            continue
        if row["id"] in first_line:
            rejected.append({"line": i, "reason": f"prompt id {row['id']!r} already answered on line "
                                                  f"{first_line[row['id']]}; its stories would repeat doc ids"})
            continue
        first_line[row["id"]] = i
        for k, part in enumerate(p.strip() for p in _SEPARATOR.split(text or "")):
            if not part:
                continue
            problems = validate_story(part, concept)
            if problems:
                rejected.append({"line": i, "story": k, "reason": "; ".join(problems)})
                continue
            rows.append(json.dumps({"doc_id": f"llm/{emotion}/{topic_index}/{k}", "text": part, "label": emotion,
                                    "topic": topic}) + "\n")
    write_text(out, "".join(rows))  # only now: a failure above leaves the previous output untouched
    return {"kept": len(rows), "rejected": rejected}
