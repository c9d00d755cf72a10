"""Compare the per-epoch histories of two `scripts/history_snapshot.sh` outputs:
accuracy, images synthesized, status and every loss term (to 1e-10).

    python scripts/compare_histories.py /tmp/hist_old /tmp/hist_new
"""
import json
import sys
from pathlib import Path


def load(root: Path) -> dict:
    files = sorted(root.glob("bench*/cells/*/history.json")) + sorted(root.glob("distill/*/history.json"))
    return {str(f.relative_to(root)): json.loads(f.read_text()) for f in files}


def same(a: dict, b: dict) -> bool:
    rounded = lambda h: {k: [round(x, 10) for x in v] for k, v in h["losses"].items()}  # noqa: E731
    return all(a[k] == b[k] for k in ("accuracy", "images_synthesized", "status")) and rounded(a) == rounded(b)


def largest_difference(a: dict, b: dict) -> str:
    """The loss term of `b` that moved most from `a`, relative to its size, for a DIFF line."""
    worst, where = 0.0, ""
    for term in set(a["losses"]) & set(b["losses"]):
        for epoch, (x, y) in enumerate(zip(a["losses"][term], b["losses"][term]), 1):
            if x == x and y == y and abs(x - y) / max(abs(x), 1e-12) > worst:  # NaN (no KD in warm-up) skipped
                worst, where = abs(x - y) / max(abs(x), 1e-12), f"{term} epoch {epoch}"
    first = max((abs(a["losses"][t][0] - b["losses"][t][0]) / max(abs(a["losses"][t][0]), 1e-12)
                 for t in set(a["losses"]) & set(b["losses"])
                 if a["losses"][t] and b["losses"][t] and a["losses"][t][0] == a["losses"][t][0]
                 and b["losses"][t][0] == b["losses"][t][0]), default=0.0)
    # Epoch 1 shows the rounding itself; later epochs add what training makes of it.
    return f"; largest loss change {worst:.1e} ({where}), in epoch 1 {first:.1e}" if where else ""


def main() -> int:
    if len(sys.argv) != 3 or not all(Path(a).is_dir() for a in sys.argv[1:]):
        print("usage: python scripts/compare_histories.py OLD_OUT NEW_OUT  (two history_snapshot.sh folders)",
              file=sys.stderr)
        return 2
    old, new = load(Path(sys.argv[1])), load(Path(sys.argv[2]))
    different = 0
    for name in sorted(set(old) | set(new)):
        if name not in old or name not in new:
            print(f"MISSING {name} (only in {'old' if name in old else 'new'})")
            different += 1
            continue
        ok = same(old[name], new[name])
        different += not ok
        print(f"{'SAME' if ok else 'DIFF'} {name}: accuracy {old[name]['accuracy']}"
              + ("" if ok else f" -> {new[name]['accuracy']}{largest_difference(old[name], new[name])}"))
    print(f"{len(old) - different} same, {different} different")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
