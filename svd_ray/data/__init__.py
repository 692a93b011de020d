"""Benchmark data: offline loaders (checksummed), user JSONL tasks, the built-in demo task, splits.

Pure Python; no model code. See docs/DATA.md for formats, templates, splits and what is offline.
"""
from .builtin import BuiltinTask, builtin_task
from .checksums import ChecksumError, parse_sha256sums, sha256_file, verify_files
from .commonsense import (
    COMMONSENSE_TASKS,
    OFFLINE_SPLITS,
    CommonsenseRecord,
    load_commonsense_mc,
    load_commonsense_records,
    load_commonsense_train,
    load_commonsense_train_mix,
)
from .jsonl import JSONLFileErrors, JSONLFormatError, load_jsonl_gen, load_jsonl_mc, load_jsonl_train, write_jsonl
from .paths import ENV_VAR, DataUnavailableError, default_data_dir, resolve_data_dir
from .splits import DEFAULT_FRACTIONS, SplitRecord, ids_digest, make_split
from .truthfulqa import (
    QA_PRIMER,
    TruthfulQAMC,
    TruthfulQAQuestion,
    format_prompt,
    load_truthfulqa_gen,
    load_truthfulqa_mc,
    load_truthfulqa_questions,
    load_truthfulqa_train,
    truthfulqa_split,
)
from .types import GenItem, MCItem, TrainExample

__all__ = [
    "BuiltinTask",
    "COMMONSENSE_TASKS",
    "ChecksumError",
    "CommonsenseRecord",
    "DEFAULT_FRACTIONS",
    "DataUnavailableError",
    "ENV_VAR",
    "GenItem",
    "JSONLFileErrors",
    "JSONLFormatError",
    "MCItem",
    "OFFLINE_SPLITS",
    "QA_PRIMER",
    "SplitRecord",
    "TrainExample",
    "TruthfulQAMC",
    "TruthfulQAQuestion",
    "builtin_task",
    "default_data_dir",
    "format_prompt",
    "ids_digest",
    "load_commonsense_mc",
    "load_commonsense_records",
    "load_commonsense_train",
    "load_commonsense_train_mix",
    "load_jsonl_gen",
    "load_jsonl_mc",
    "load_jsonl_train",
    "load_truthfulqa_gen",
    "load_truthfulqa_mc",
    "load_truthfulqa_questions",
    "load_truthfulqa_train",
    "make_split",
    "parse_sha256sums",
    "resolve_data_dir",
    "sha256_file",
    "truthfulqa_split",
    "verify_files",
    "write_jsonl",
]
