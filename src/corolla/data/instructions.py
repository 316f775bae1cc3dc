"""Instruction data from any DataSource: `prompt` / `response` columns, or chat `messages`.

`messages` rows (a list of {role, content} ending with the assistant's turn, as
JSON Lines nest them or as JSON text in a CSV cell or a database column) become
prompt = every turn before the last, response = the last turn's content. The result
is a Dataset of `prompt` and `response`, in memory or memory-mapped from the silo
cache, read batch by batch like labelled text (`corolla.data.labelled`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import datasets
import pyarrow as pa

from corolla.data import cache
from corolla.data.errors import SiloError
from corolla.data.source import DataSource

BATCH_ROWS = 4096
_TURN = pa.struct([("role", pa.string()), ("content", pa.string())])
_CHAT_SCHEMA = pa.schema([("prompt", pa.list_(_TURN)), ("response", pa.string())])
_TEXT_SCHEMA = pa.schema([("prompt", pa.string()), ("response", pa.string())])
_TURN_FEATURE = [{"role": datasets.Value("string"), "content": datasets.Value("string")}]


def load_instructions(source: DataSource, cache_dir: str | os.PathLike[str] | None = None) -> datasets.Dataset:
    """Read `source` into a Dataset of `prompt` and `response`; SiloError for missing columns, no rows, empty answers."""
    cols = set(source.columns)
    chat = "messages" in cols
    if not chat and not {"prompt", "response"} <= cols:
        raise SiloError(f"{source.what} has columns {sorted(cols)}; an instruction silo needs `prompt` and "
                        "`response` columns, or a `messages` column of chat turns.")
    reader = _Reader(source, chat)
    schema = _CHAT_SCHEMA if chat else _TEXT_SCHEMA
    features = datasets.Features({"prompt": _TURN_FEATURE if chat else datasets.Value("string"),
                                  "response": datasets.Value("string")})
    key = source.cache_key()
    target = cache.cache_target(f"{source.cache_stem}-instructions", f"{source.identity()}|{chat}", f"{key}", cache_dir)
    return cache.materialize(reader.batches, schema, datasets.DatasetInfo(features=features), target,
                             source.size_bytes(), key is not None, source.what, reader.check_complete)


class _Reader:
    def __init__(self, source: DataSource, chat: bool) -> None:
        self.source, self.chat = source, chat
        self.rows, self.empty, self.first_empty = 0, 0, -1

    def batches(self) -> Iterator[pa.RecordBatch]:
        self.rows, self.empty, self.first_empty = 0, 0, -1
        cols = ["messages"] if self.chat else ["prompt", "response"]
        for batch in self.source.iter_batches(cols, BATCH_ROWS):
            if not batch.num_rows:
                continue
            if self.chat:
                pairs = [_split_messages(m) for m in batch.column("messages").to_pylist()]
                prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
                out = pa.RecordBatch.from_arrays([pa.array(prompts, pa.list_(_TURN)), pa.array(responses, pa.string())],
                                                 schema=_CHAT_SCHEMA)
            else:
                prompts = [_text(v) for v in batch.column("prompt").to_pylist()]
                responses = [_text(v) for v in batch.column("response").to_pylist()]
                out = pa.RecordBatch.from_arrays([pa.array(prompts, pa.string()), pa.array(responses, pa.string())],
                                                 schema=_TEXT_SCHEMA)
            for i, r in enumerate(responses):
                if not str(r or "").strip():
                    self.empty += 1
                    if self.first_empty < 0:
                        self.first_empty = self.rows + i
            self.rows += batch.num_rows
            yield out

    def check_complete(self) -> None:
        if self.empty:
            raise SiloError(f"{self.source.what}: {self.empty} rows have an empty response (first: row "
                            f"{self.first_empty}); remove them or fill in the answers.")
        if self.rows == 0:
            raise SiloError(f"{self.source.what} has no rows; a client needs at least one example.")


def _text(value: object) -> str | None:
    return value if value is None or isinstance(value, str) else str(value)


def _split_messages(turns: object) -> tuple[list[dict], str]:
    if isinstance(turns, str):  # a CSV cell or a database text column holding the JSON list
        try:
            turns = json.loads(turns)
        except ValueError:
            raise SiloError("a `messages` value is not JSON; write each row's chat as a JSON list of "
                            '{"role": ..., "content": ...} turns.') from None
    turns = turns if isinstance(turns, list) else []
    if len(turns) < 2 or not isinstance(turns[-1], dict) or turns[-1].get("role") != "assistant":
        raise SiloError("a `messages` row must hold at least a user turn followed by the assistant's answer, "
                        f"got roles {[t.get('role') for t in turns if isinstance(t, dict)]}.")
    return [{"role": t["role"], "content": t["content"]} for t in turns[:-1]], turns[-1]["content"]
