"""The per-epoch metrics log: `metrics.jsonl` (one JSON object per epoch) and `metrics.csv` beside it."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
CSV_FILE = "metrics.csv"
REQUIRED_KEYS = (
    "epoch", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "epoch_time_s", "train_images_per_s",
)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # A line cut short by a kill: the epoch is redone on resume.
            break
    return records


class MetricsLog:
    """Appends epoch records durably; on resume it drops records of epochs after the restored one, so an
    epoch is never logged twice."""

    def __init__(self, workdir: str):
        self.workdir = Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self.csv_path = self.workdir / CSV_FILE

    def keep_up_to(self, epoch: int) -> None:
        records = [r for r in read_metrics(str(self.workdir)) if r.get("epoch", 0) <= epoch]
        self._rewrite(records)

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_csv(read_metrics(str(self.workdir)))

    def _rewrite(self, records: list[dict[str, Any]]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)
        self._write_csv(records)

    def _write_csv(self, records: list[dict[str, Any]]) -> None:
        columns = list(REQUIRED_KEYS)
        for record in records:
            columns.extend(k for k in record if k not in columns)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
        os.replace(tmp, self.csv_path)
