"""benchmarks/fid_block_spread.py on a few samples of the embedded Fashion model."""

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "fid_block_spread.py"


def _load():
    spec = importlib.util.spec_from_file_location("fid_block_spread", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_seed_blocks_against_random_partitions(tmp_path, capsys):
    mod = _load()
    cache = tmp_path / "f.pt"
    args = ["--samples", "20", "--nfe", "2", "--sizes", "5", "10", "--partitions", "4", "--features", str(cache)]
    assert mod.main(args) == 0
    first = capsys.readouterr().out
    rows = [line for line in first.splitlines() if line.startswith("| 5 |") or line.startswith("| 10 |")]
    assert len(rows) == 2 and "| 4 |" in rows[0] and "| 2 |" in rows[1]
    feats = torch.load(cache)
    assert feats.shape[0] == 20 and bool(torch.isfinite(feats).all())
    # the seeds are the benchmark's: the same features from the cache give the same table
    assert mod.main(args) == 0
    assert capsys.readouterr().out.split("pooled")[1] == first.split("pooled")[1]
