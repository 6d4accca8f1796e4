"""bench/gpu_check.sh's bookkeeping: the environment record, the merged JSON and the closing table.

    python bench/gpu_report.py env WORK --mode gpu|cpu      # WORK/json/env.json: versions, GPU, missing packages
    python bench/gpu_report.py collect WORK OUT             # OUT/gpu_check.json: every step's JSON and status
    python bench/gpu_report.py table WORK OUT               # the summary table, printed and in OUT/summary.txt;
                                                            # exit 1 when a step failed or timed out

WORK is the check's scratch folder: WORK/steps.jsonl holds one {"name", "status", "rc", "seconds", "reason"} line
per step (written by gpu_check.sh), WORK/json/NAME.json the figures of step NAME, WORK/pytest_cuda.xml pytest's
JUnit report. Only the standard library and the benches' JSON are read, so this runs when torch itself is broken.
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from atomic import atomic_write  # noqa: E402

PACKAGES = {"torch": "torch", "nvidia.dali": "nvidia-dali", "webdataset": "webdataset", "torch_ema": "torch-ema"}


def version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # a broken install is as good as none here
        return None
    return str(getattr(mod, "__version__", "installed"))


def env(work: Path, mode: str) -> dict:
    """What the check runs on: Python, packages, torch's CUDA view, nvidia-smi's first lines."""
    record = {"mode": mode, "python": platform.python_version(), "executable": sys.executable,
              "pythonpath": os.environ.get("PYTHONPATH", ""),
              "packages": {name: version(module) for module, name in PACKAGES.items()}}
    record["missing"] = [name for name, v in record["packages"].items() if v is None]
    try:
        import torch
        record.update(cuda_available=torch.cuda.is_available(), torch_cuda=torch.version.cuda)
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            record.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1),
                          compute_capability=f"{p.major}.{p.minor}", gpus=torch.cuda.device_count())
    except Exception as e:
        record["torch_error"] = f"{type(e).__name__}: {e}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        record["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError):
        record["nvidia_smi"] = None
    try:
        record["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                          text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        record["commit"] = None
    write(work / "json" / "env.json", record)
    print(json.dumps(record))
    return record


def pytest_summary(xml: Path) -> dict | None:
    """Counts and the failed and skipped tests (with the reason) of a JUnit report."""
    if not xml.is_file():
        return None
    try:
        root = ElementTree.parse(xml).getroot()
    except ElementTree.ParseError as e:
        return {"error": f"unreadable JUnit report: {e}"}
    cases, failed, skipped, uncollected = list(root.iter("testcase")), [], [], []
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        for kind in ("failure", "error"):
            for node in case.findall(kind):
                if node.get("message") == "collection failure":  # a module that did not import: no test ran
                    last = (node.text or "").strip().splitlines()[-1:] or [""]
                    uncollected.append({"module": name, "message": last[0][:300]})
                else:
                    failed.append({"test": name, "message": (node.get("message") or "")[:300]})
        for node in case.findall("skipped"):
            skipped.append({"test": name, "reason": (node.get("message") or "")[:200]})
    tests = len(cases) - len(uncollected)
    return {"tests": tests, "failed": len(failed), "skipped": len(skipped),
            "passed": tests - len(failed) - len(skipped), "not_collected": uncollected, "failures": failed,
            "skips": skipped}


def read_steps(work: Path) -> list[dict]:
    path = work / "steps.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except ValueError:
            continue
    return steps


def merged(work: Path) -> dict:
    out: dict = {"steps": read_steps(work)}
    for path in sorted((work / "json").glob("*.json")):
        try:
            out[path.stem] = json.loads(path.read_text())
        except ValueError as e:  # a step killed while writing cannot leave half a file (atomic), but say so
            out[path.stem] = {"error": f"unreadable: {e}"}
    manifest = work / "data" / "shards" / "manifest.json"
    if manifest.is_file():  # the data step's shards: what the DALI steps read
        m = json.loads(manifest.read_text())
        out["data"] = {"size": m.get("size"), "splits": {k: v.get("count") for k, v in m.get("splits", {}).items()}}
    pytest = pytest_summary(work / "pytest_cuda.xml")
    if pytest is not None:
        out["pytest_cuda"] = pytest
    env_record = out.get("env", {})
    out["gpu_figures"] = bool(env_record.get("cuda_available")) and env_record.get("mode") == "gpu"
    return out


def write(path: Path, record: dict) -> None:
    atomic_write(path, (json.dumps(record, indent=1) + "\n").encode())


def collect(work: Path, out: Path) -> dict:
    report = merged(work)
    write(out / "gpu_check.json", report)
    return report


# ----------------------------------------------------------------------------------------------------- table

def fmt(value: float | None, spec: str = ",.1f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def grid_lines(g: dict) -> list[str]:
    rows = [r for r in g.get("rows", []) if "images_per_s" in r]
    lines = [f"matmul {g['matmul']['dtype']} {fmt(g['matmul']['tflops'])} TFLOP/s; "
             f"{len(rows)} rows timed, {sum('skipped' in r for r in g.get('rows', []))} skipped, "
             f"{sum('error' in r for r in g.get('rows', []))} failed"] if "matmul" in g else []
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = [r for r in rows if r["preset"] == preset]
        base = next((r for r in mine if r["precision"] == "fp16" and not r["channels_last"] and not r["compile"]),
                    None)
        best = max(mine, key=lambda r: r["images_per_s"])
        how = f"{best['precision']}{' cl' if best['channels_last'] else ''}{' compile' if best['compile'] else ''}"
        mfu = fmt(None if best.get("mfu") is None else 100 * best["mfu"], ".1f", "%")
        line = (f"{preset} b{best['batch']}: best {fmt(best['images_per_s'])} img/s ({how}), "
                f"{fmt(best['ms_per_step'], '.1f')} ms/step, MFU {mfu}, peak {fmt(best.get('peak_mem_gb'))} GB")
        if base is not None and base is not best:
            line += f"; fp16 nchw eager {fmt(base['images_per_s'])}"
        lines.append(line)
    return lines


def step_result(name: str, report: dict) -> list[str]:
    """One to a few lines of the figures a step produced."""
    r = report.get(name)
    if name == "env" and r:
        pk = r["packages"]
        return [f"{r.get('gpu') or 'no GPU'}; torch {pk['torch']} (CUDA {r.get('torch_cuda')}), DALI "
                f"{pk['nvidia-dali']}, webdataset {pk['webdataset']}, torch-ema {pk['torch-ema']}"
                + (f"; MISSING {', '.join(r['missing'])}" if r["missing"] else "")]
    if name == "data" and r:
        return [f"shards at {r['size']} px: " + ", ".join(f"{k} {v}" for k, v in r["splits"].items())]
    if name == "train_grid" and r:
        return grid_lines(r.get("grid", {}))
    if name == "sampling" and r:
        lines = []
        for row in r.get("rows", []):
            if "seconds" in row:
                lines.append(f"{row['sampler']}-{row['steps']} {row['preset']} {row['precision']} {row['mode']}: "
                             f"{row['seconds']:.2f} s for {row['batch']}")
        for t in r.get("throughput", []):
            lines.append(f"{t['preset']} largest batch {t['largest_batch']}: {fmt(t['ddim50_images_per_s'])} "
                         f"DDIM-50 img/s ({t['precision']} {t['mode']})")
        return lines or ["no timed row"]
    if name == "ema" and r and ("ema" in r or "draws" in r):
        lines = []
        if "ema" in r:
            e = r["ema"]
            lines.append(f"{e['preset']}: torch-ema {e['torch_ema_ms']:.3f} ms = "
                         f"{100 * e['torch_ema_share_of_step']:.2f}% of a step; one foreach lerp_ "
                         f"{e['foreach_ms']:.3f} ms; switch advised: {e['foreach_advised']}")
        if r.get("draws", {}).get("rows"):
            d = r["draws"]
            lines.append(f"draws, {d['preset']} batch {d['batch']} per rank, step {d['step_ms']:.1f} ms: "
                         + ", ".join(f"W={row['world_size']} {row['draw_ms']:.2f} ms "
                                     f"(+{100 * row['extra_share_of_step']:.2f}%)" for row in d["rows"]))
        return lines
    if name == "decode" and r:
        return [f"{'PASS' if r['pass'] else 'FAIL'} {r['candidate']} vs {r['reference']}: max "
                f"{r['max_abs_levels']:.2f} levels (tol {r['tol_levels']:g}) over {r['images']} images"]
    if name == "resume" and r:
        failed = [k for k, ok in r["checks"].items() if not ok]
        return [f"{'PASS' if r['pass'] else 'FAIL ' + ', '.join(failed)}: SIGTERM at {r['signalled_at_step']}, "
                f"resumed at {r['stop_step']} of {r['steps']}; loss {fmt(r['loss_before_stop'], '.4f')} -> "
                f"{fmt(r['loss_after_resume'], '.4f')}; data wait {fmt(r['first_run']['data_wait'], '.1%')}, "
                f"{fmt(r['first_run']['images_per_s'])} img/s"]
    if name == "data_e2e" and r:
        lines = [f"data wait {d['loader']}: {fmt(d.get('data_wait'), '.1%')} ({fmt(d.get('images_per_s'))} img/s)"
                 for d in r.get("data", {}).get("rows", []) if "data_wait" in d]
        e2e = r.get("e2e")
        if e2e:
            rates = {row["name"]: row.get("images_per_s") for row in e2e["rows"]}
            lines.append(f"e2e {e2e['preset']}: seed-style {fmt(rates.get('seed-style'))} img/s, ours "
                         f"{fmt(rates.get('ours'))} img/s = {fmt(e2e['ratio'], '.2f', 'x')}")
        return lines
    if name == "pytest_cuda" and r:
        if "error" in r:
            return [r["error"]]
        lines = [f"{r['passed']} passed, {r['failed']} failed, {r['skipped']} skipped"]
        lines += [f"FAILED {f['test']}: {f['message'][:100]}" for f in r["failures"][:5]]
        lines += [f"NOT COLLECTED {u['module']}: {u['message'][:100]}" for u in r["not_collected"]]
        return lines
    return []


def table(work: Path, out: Path) -> str:
    report = collect(work, out)
    env_record = report.get("env", {})
    head = ("GPU check on " + (env_record.get("gpu") or "?") if report["gpu_figures"]
            else "GPU check in CPU mode: no GPU figures (tiny sizes; every timing below is a CPU's)")
    lines = [head + f", commit {env_record.get('commit')}", f"{'step':12s} {'status':8s} {'s':>5s}  result"]
    for step in report["steps"]:
        result = step_result(step["name"], report) or [step.get("reason") or ""]
        if step.get("reason") and step["status"] != "ok":
            result = [step["reason"], *[r for r in result if r != step["reason"]]]
        lines.append(f"{step['name']:12s} {step['status']:8s} {step.get('seconds', 0):5.0f}  {result[0]}")
        lines += [f"{'':28s}{more}" for more in result[1:]]
    failed = [s["name"] for s in report["steps"] if s["status"] not in ("ok", "skipped")]
    lines.append(f"{len(report['steps'])} steps, {len(failed)} not ok{': ' + ', '.join(failed) if failed else ''}; "
                 f"figures: {out / 'gpu_check.json'}, log: {out / 'gpu_check.log'}")
    text = "\n".join(lines) + "\n"
    atomic_write(out / "summary.txt", text.encode())
    print(text, end="")
    return text


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "env":
        mode = args[args.index("--mode") + 1] if "--mode" in args else "gpu"
        env(Path(args[1]), mode)
    elif len(args) == 3 and args[0] == "collect":
        collect(Path(args[1]), Path(args[2]))
    elif len(args) == 3 and args[0] == "table":
        table(Path(args[1]), Path(args[2]))
        # The check's exit status: 1 when a step failed or ran out of time (a skipped step is not a failure).
        if any(s["status"] not in ("ok", "skipped") for s in read_steps(Path(args[1]))):
            raise SystemExit(1)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
