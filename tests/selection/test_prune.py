from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsift.cli import main


def write_dealrec(root: Path) -> Path:
    d = root / "tiny"
    d.mkdir()
    lines = [f"{u} " + " ".join(str(1 + (u * 7 + k) % 30) for k in range(2 + u % 6)) for u in range(1, 60)]
    lines.append("60 5")  # one item: no input, must be excluded and counted
    (d / "train.txt").write_text("\n".join(lines) + "\n")
    (d / "items.tsv").write_text("item_id\ttitle\tcategory\n" + "".join(f"{i}\tGame {i}\tx\n" for i in range(1, 31)))
    return d


@pytest.mark.parametrize("method", ["dealrec", "grand", "random"])
def test_prune_writes_scores_and_a_report(tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_dealrec(tmp_path)
    out = tmp_path / "out"
    assert main(["prune", "--dataset", str(data), "--method", method, "--epochs", "2", "--out", str(out), "--budget", "10",
                 "--set", "scoring.scorer.depth=20", "--set", "scoring.hidden=16"]) == 0
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())
    assert len(rows) == 59 and report["too_short"] == 1 and report["scored"] == 59
    assert "60" not in {r["user_id"] for r in rows}
    assert all(isinstance(r["score"], float) for r in rows)
    assert len(report["epoch_seconds"]) == 2
    assert "samples scored" in capsys.readouterr().out
    chosen = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    assert len(chosen) == report["selected"] == 10 and len({c["sample_id"] for c in chosen}) == 10
    by_id = {r["sample_id"]: r["score"] for r in rows}
    assert all(by_id[c["sample_id"]] == c["score"] for c in chosen if method != "random")
    if method == "grand":  # top-k hardest
        assert min(c["score"] for c in chosen) >= sorted(by_id.values())[-10]
