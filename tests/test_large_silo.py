"""A several-hundred-MB silo trains in a trainer process whose memory does not grow with the file.

Before, a silo was read whole with pandas and tokenized up front: a 2 GB CSV took a
trainer to 20 GB RSS. Now it is streamed into a memory-mapped Arrow cache and
tokenized per batch. bench/silo_memory.py measures the same at other sizes.
"""

from __future__ import annotations

import math

import pytest

from bench.silo_memory import MIB, measure_trainer, write_big_csv

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SILO_MB = 300
#: the trainer's own footprint (torch, transformers, datasets, the model) is ≈ 0.55-0.75 GiB; the old whole-file
#: read needed ≈ 10× the file (3 GiB here). The bound leaves room for the mapped file's resident pages.
PEAK_RSS_BOUND = 1.5 * 2**30


def test_a_300_mb_csv_silo_trains_with_bounded_memory(tmp_path):
    silo = tmp_path / "big.csv"
    rows = write_big_csv(silo, SILO_MB)
    assert silo.stat().st_size > 250 * MIB
    cache = tmp_path / "cache"
    m = measure_trainer(silo, cache, model="tiny-bert", max_length=32, steps=5, rows=rows)
    print(f"\n{m.file_bytes / MIB:.0f} MiB silo, {rows} rows: peak RSS {m.peak_rss / MIB:.0f} MiB "
          f"(anonymous {m.peak_anon / MIB:.0f} MiB), ready in {m.ready_s:.1f} s, one 5-step job {m.train_s:.2f} s")
    assert m.num_examples == rows and math.isfinite(m.loss) and m.loss > 0
    assert m.peak_rss < PEAK_RSS_BOUND, f"peak RSS {m.peak_rss / MIB:.0f} MiB for a {m.file_bytes / MIB:.0f} MiB silo"
    assert m.peak_anon < m.peak_rss <= m.peak_anon + m.file_bytes + 256 * MIB
    [arrow] = cache.glob("big-*.arrow")  # converted once into the cache folder, never beside the silo
    assert arrow.stat().st_size < m.file_bytes and sorted(p.name for p in tmp_path.iterdir()) == ["big.csv", "cache"]
