"""benchmarks/gpu_throughput.py's handling of its part's time limit, without a model (seconds; the scripts' smoke
runs are in test_gpu_scripts.py, under -m slow)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_row_cut_by_the_time_limit_keeps_its_timed_steps(tmp_path, monkeypatch):
    """`timeout` killed a row (the compile row: minutes) and everything it had measured went with the process;
    SIGTERM now ends the row with the steps it logged (a torn last line skipped), and the script after it."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # the script blocks wandb on import; undone after this test
    import gpu_throughput as g

    def cut_train(cfg):
        lines = [json.dumps({"step": s, "sec_per_step": t}) for s, t in ((1, 9.0), (2, 0.5), (3, 0.7))]
        Path(cfg.output_dir).mkdir()
        Path(cfg.output_dir, "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "sec_')
        g._on_sigterm(15, None)

    monkeypatch.setattr("t2i_align.loop.train", cut_train)
    monkeypatch.setattr(g, "CUT", [])
    row = g.timed_row("sd15/dpo_lora.yaml", [], tmp_path / "run", 2, 1, 989.4, None)
    assert row["s_per_step"] == 0.6 and row["note"] == "cut by the time limit: 2 timed step(s)" and g.CUT
    assert not (tmp_path / "run").exists()
