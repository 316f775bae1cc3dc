"""The trainer's command-line options, shared by `corolla client` and `corolla trainer`.

A module of its own so that building the `corolla` parser imports no model library.
"""

from __future__ import annotations

import argparse

from corolla.config import RunConfig
from corolla.data.source import SourceOptions
from corolla.spec import AUTO, DEFAULT_TASK, TASKS, TaskSpec


def add_source_args(p: argparse.ArgumentParser, tables: str = "the table holding this site's rows") -> None:
    """The connector flags that go with --data (`corolla.data.source.SourceOptions`)."""
    p.add_argument("--table", default="", metavar="NAME", help=f"with a database --data: {tables} (schema.table "
                   "for another schema)")
    p.add_argument("--query", default="", metavar="SQL",
                   help="with a database --data: one SELECT giving the rows instead of --table (read-only)")
    p.add_argument("--split", default="", help="with a saved DatasetDict as --data: its split (default: train)")
    p.add_argument("--db-password-file", default="", metavar="FILE",
                   help="file holding the database password (else $COROLLA_DB_PASSWORD; never put it in the URL)")


def source_options(args: argparse.Namespace) -> SourceOptions:
    """The SourceOptions of parsed --table/--query/--split/--db-password-file."""
    return SourceOptions(table=args.table, query=args.query, split=args.split, password_file=args.db_password_file)


def add_trainer_args(p: argparse.ArgumentParser) -> None:
    """Add the trainer's options to a parser (shared by `corolla client` and `corolla trainer`)."""
    p.add_argument("--data", metavar="FILE|DIR|URL",
                   help="this site's silo: a CSV/JSONL/Parquet file, a folder of them (rows concatenated), a dataset "
                        "saved with `save_to_disk`, or a database URL (postgresql://user@host:port/db, "
                        "sqlite:///path.db) with --table or --query; omit to use a built-in partition")
    add_source_args(p)
    p.add_argument("--eval-data", default="", metavar="FILE|DIR",
                   help="this site's own evaluation set (same columns as --data): the run's site evaluation reads it, "
                        "and the whole silo trains; omitted: the run's eval-fraction of the silo is held out")
    p.add_argument("--text-column", default="text", help="name of the text column in --data (default: text)")
    p.add_argument("--label-column", default="label", help="name of the label column in --data (default: label)")
    p.add_argument("--cache-dir", default=None,
                   help="where a --data file over 32 MiB is converted to a memory-mapped Arrow file (about the file's "
                        "size; reused on restart): default $COROLLA_CACHE_DIR, else ~/.cache/huggingface/datasets/"
                        "corolla-silos (follows HF_HOME / HF_DATASETS_CACHE)")
    p.add_argument("--partition-id", type=int, default=0, help="built-in partition when --data is omitted")
    p.add_argument("--num-partitions", type=int, default=1, help="number of built-in partitions")
    p.add_argument("--dirichlet-alpha", type=float, default=RunConfig.dirichlet_alpha,
                   help="label skew of built-in partitions (as the run's `dirichlet-alpha`)")
    p.add_argument("--rank", default="8", help="this node's LoRA rank, or `auto` to pick one from the device (default: 8)")
    p.add_argument("--task", default=DEFAULT_TASK, help=f"{', '.join(TASKS)} (as the run's `task`)")
    p.add_argument("--model", default=AUTO,
                   help="a Hugging Face model folder, or a built-in name: minilm, smollm2, tiny-bert/tiny-llama (tests); "
                        "auto: the task's default")
    p.add_argument("--dataset", default=AUTO, help="the run's corpus, whose class names the silo uses (bbc, wordnet)")
    p.add_argument("--labels", default="", help="comma-separated class names of your own data (as the run's `labels`)")
    p.add_argument("--max-length", type=int, default=TaskSpec.max_length)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass: less memory for long sequences and large models, "
                        "about a third more compute; the result is the same")
    p.add_argument("--quantize", choices=["none", "4bit"], default="none",
                   help="4bit: hold the frozen base in 4-bit NF4 (QLoRA; CUDA and bitsandbytes; a model folder)")
    p.add_argument("--follow-run", action="store_true",
                   help="reload for a run that needs another task, model, labels or max-length (one model held at a "
                        "time). Default: serve only what this trainer was started with and refuse any other run, so a "
                        "server can neither make the site load other files nor probe its labels")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slowdown", type=float, default=1.0, help="emulate hardware this many times slower (tests, demos)")
