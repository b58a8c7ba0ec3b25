"""Every benchmarks/ script answers `--help` with its usage, and runs nothing: some once took it for an argument
(IndexError traceback) or ignored it and started a minutes-long measurement."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One process for all scripts (imports paid once): each runs as __main__ with `--help`, which must end in
# SystemExit(0) after printing "usage:"; anything else is reported by name.
PROBE = r"""
import contextlib, io, runpy, sys
sys.path.insert(0, BENCH)
bad = []
for path in SCRIPTS:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        bad.append(f"{path}: ran instead of printing its usage")
    except SystemExit as e:
        if e.code not in (0, None) or not out.getvalue().startswith("usage:"):
            bad.append(f"{path}: exit {e.code}, printed {out.getvalue()[:80]!r}")
    except Exception as e:
        bad.append(f"{path}: {type(e).__name__}: {e}")
print("\n".join(bad))
"""


def test_every_benchmark_script_prints_its_usage_for_help():
    scripts = sorted(str(p) for p in (ROOT / "benchmarks").glob("*.py")
                     if 'if __name__ == "__main__":' in p.read_text())
    assert len(scripts) >= 20  # the scripts run from the command line, not the modules they import
    code = f"BENCH = {str(ROOT / 'benchmarks')!r}\nSCRIPTS = {scripts!r}\n{PROBE}"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", done.stdout
