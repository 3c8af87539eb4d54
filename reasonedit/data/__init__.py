"""Data: records of the four sample kinds, shards, loading, packing into fixed-budget batches.

The synthetic shapes world that makes the demo's records is its own package, `reasonedit.shapes`."""

from .samples import EditPair, Record, ReflectionSample, TextToImage, ThinkingPair
from .shards import read_records, write_records

__all__ = ["EditPair", "Record", "ReflectionSample", "TextToImage", "ThinkingPair", "read_records", "write_records"]
