"""The text of a dataset: what the tiny tokenizer learns its vocabulary from."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from .samples import EditPair, ReflectionSample, TextToImage, ThinkingPair
from .shards import read_records


def dataset_texts(path: str | Path, split: str = "train") -> Iterator[str]:
    for r in read_records(path, split=split):
        if isinstance(r, EditPair):
            yield r.instruction
        elif isinstance(r, ThinkingPair):
            yield r.abstract_instruction
            yield r.concrete_instruction
        elif isinstance(r, ReflectionSample):
            yield from (r.instruction, r.target_description, r.reason, r.thought, r.new_instruction)
        elif isinstance(r, TextToImage):
            yield r.caption


__all__ = ["dataset_texts"]
