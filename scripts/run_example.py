"""The worked three-organisation example in `peers/`, end to end on loopback.

Two hospitals hold different columns of the same patients as CSV files keyed by `patient_id`
(a few patients missing at each); a lab holds the diagnoses (`patient_id,diagnosis`) and
coordinates. `policies/hospitals_lab.yaml` is the policy all three signed and
`policies/deployments/hospitals_lab.deployment.yaml` the deployment they share.

    python scripts/run_example.py            # what `make example` runs: check, train, verify, predict
    python scripts/run_example.py --training-only
    python scripts/run_example.py data       # rewrite peers/data/*.csv (deterministic)

Steps: the example keys are made private (git keeps no file modes); the policy is checked
against the deployment; each organisation's data is checked against the deployment
(`secure-split data check`); one `secure-split peer run` process per file in `peers/` trains;
the audit logs are verified (`secure-split audit verify`); then the lab asks for the diagnosis
of the 20 patients it has none for (`secure-split predict`; each hospital runs `secure-split
serve` with its own columns) and the audit logs, the request included, are verified again.
Exits 0 only if every step worked (and at least 75 % of those predictions match the diagnoses
scikit-learn's data set records). Everything a run writes goes to
`example-work/` (git-ignored), cleared first.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("hospital_a", "hospital_b", "lab")
POLICY = Path("policies/hospitals_lab.yaml")
DEPLOYMENT = Path("policies/deployments/hospitals_lab.deployment.yaml")
WORK = Path("example-work")
HOSPITAL_A_COLUMNS = 15
"""hospital_a holds the first 15 of the 30 measurements, hospital_b the other 15."""
SEED = 2024
MIN_AGREEMENT = 0.75
"""The share of the 20 held-back patients whose predicted diagnosis must match the recorded one."""


def example_data() -> dict[str, str]:
    """The example's CSV files, as text: scikit-learn's bundled breast-cancer set split by columns.

    Patient ids are 10001..10569. hospital_a misses 12 patients and has 6 blank cells in
    `mean_smoothness` (imputed by its peer config); hospital_b misses 12 other patients, lists its
    rows in another order, and adds `clinic`, a categorical column (synthetic: which of its three
    clinics saw the patient; one-hot encoded by its peer config); the lab has no diagnosis yet
    for 20 patients both hospitals hold (0 malignant, 1 benign, as scikit-learn codes them):
    those are the rows the example predicts, listed in `lab_to_predict.csv` (`patient_id`).
    """
    return _example()[0]


def held_back_diagnoses() -> dict[int, int]:
    """The diagnoses scikit-learn's data set records for the patients of `lab_to_predict.csv`
    (the example compares its predictions with them; no party of the example holds them)."""
    return _example()[1]


def _example() -> tuple[dict[str, str], dict[int, int]]:
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = np.asarray(bunch.data, dtype=np.float64)
    y = np.asarray(bunch.target, dtype=np.int64)
    names = [str(n).replace(" ", "_") for n in bunch.feature_names]
    n = len(y)
    ids = np.arange(10001, 10001 + n)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(n)
    gone_a, gone_b, undiagnosed = set(perm[:12]), set(perm[12:24]), set(perm[24:44])
    blank = set(rng.choice(sorted(set(range(n)) - gone_a), size=6, replace=False).tolist())
    clinics = rng.choice(["north", "south", "west"], size=n)

    def cell(v: float) -> str:
        return repr(float(v))

    a_cols = names[:HOSPITAL_A_COLUMNS]
    smooth = a_cols.index("mean_smoothness")
    a_lines = ["patient_id," + ",".join(a_cols)]
    for i in range(n):
        if i in gone_a:
            continue
        vals = [("" if (j == smooth and i in blank) else cell(v)) for j, v in enumerate(x[i, :HOSPITAL_A_COLUMNS])]
        a_lines.append(f"{ids[i]}," + ",".join(vals))
    b_lines = ["patient_id," + ",".join(names[HOSPITAL_A_COLUMNS:]) + ",clinic"]
    for i in rng.permutation(n):
        if i in gone_b:
            continue
        b_lines.append(f"{ids[i]}," + ",".join(cell(v) for v in x[i, HOSPITAL_A_COLUMNS:]) + f",{clinics[i]}")
    lab_lines = ["patient_id,diagnosis"] + [f"{ids[i]},{y[i]}" for i in range(n) if i not in undiagnosed]
    ask_lines = ["patient_id"] + [f"{ids[i]}" for i in sorted(undiagnosed)]
    texts = {name: "\n".join(lines) + "\n" for name, lines in
             (("hospital_a", a_lines), ("hospital_b", b_lines), ("lab", lab_lines), ("lab_to_predict", ask_lines))}
    return texts, {int(ids[i]): int(y[i]) for i in sorted(undiagnosed)}


def write_data(root: Path) -> None:
    """Write peers/data/NAME.csv for the three organisations (and the lab's ids to predict)."""
    out = root / "peers" / "data"
    out.mkdir(parents=True, exist_ok=True)
    for name, text in example_data().items():
        (out / f"{name}.csv").write_text(text)
        print(f"wrote {out / name}.csv")


class StepFailed(Exception):
    """A step of the example did not work; the message says which and why."""


def _cli(root: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "secure_split", *args], cwd=root, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _step(title: str) -> None:
    print(f"== {title}", flush=True)


def _expect_ok(proc: subprocess.CompletedProcess[str], what: str) -> None:
    if proc.returncode != 0:
        raise StepFailed(f"{what} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    print(proc.stdout.rstrip())


def train(root: Path, timeout_s: float) -> dict[str, dict[str, object]]:
    """One `secure-split peer run` process per file in peers/; returns each peer's result."""
    work = root / WORK
    configs = sorted((root / "peers").glob("*.yaml"))
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    procs = {}
    for cfg in configs:
        log = (work / "logs" / f"{cfg.stem}.log").open("wb")
        cmd = [sys.executable, "-m", "secure_split", "peer", "run", str(cfg.relative_to(root)),
               "--result", str(WORK / "results" / f"{cfg.stem}.json"), "--progress", "none"]
        procs[cfg.stem] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL), log)
    deadline = time.monotonic() + timeout_s
    try:
        for name, (proc, _) in procs.items():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise StepFailed(f"peer '{name}' still running after {timeout_s:.0f} s; see {WORK}/logs/") from None
    finally:
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    results = {}
    for name, (proc, _) in procs.items():
        path = work / "results" / f"{name}.json"
        res = json.loads(path.read_text()) if path.is_file() else {}
        if proc.returncode != 0 or res.get("status") != "ok":
            tail = (work / "logs" / f"{name}.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise StepFailed(f"peer '{name}' exited {proc.returncode}: {res.get('error') or ' | '.join(tail)}")
        results[name] = res
    return results


def predict_held_back(root: Path, timeout_s: float = 120.0) -> float:
    """Predict the diagnosis of the 20 patients the lab holds no diagnosis for.

    The lab asks (`secure-split predict peers/lab.yaml --input peers/data/lab_to_predict.csv`):
    it names the patient ids; each hospital serves its own columns for them (`secure-split serve
    --max-requests 1`), after a PSI of the ids; the lab's top computes the diagnosis, so no
    prediction crosses the wire (the policy lets none: a hospital cannot ask). Then every
    party's audit log is verified again, the request included.

    Returns:
        The share of predictions that match the diagnoses scikit-learn's data set records.
    """
    work = root / WORK
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
    servers = {}
    for name in ("hospital_a", "hospital_b"):
        log = (work / "logs" / f"{name}-serve.log").open("wb")
        cmd = [sys.executable, "-m", "secure_split", "serve", f"peers/{name}.yaml", "--max-requests", "1",
               "--idle-exit", str(timeout_s), "--quiet", "--result", str(WORK / "results" / f"{name}-serve.json")]
        servers[name] = (subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL), log)
    try:
        out = WORK / "predictions.csv"
        proc = _cli(root, "predict", "peers/lab.yaml", "--input", "peers/data/lab_to_predict.csv", "--output", str(out),
                    "--quiet", "--result", str(WORK / "results" / "lab-predict.json"), timeout=timeout_s)
        _expect_ok(proc, "predict at the lab")
        for name, (server, _) in servers.items():
            try:
                code = server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise StepFailed(f"`serve` at {name} still runs after the request; see {WORK}/logs/") from None
            if code != 0:
                tail = (work / "logs" / f"{name}-serve.log").read_text(errors="replace").strip().splitlines()[-5:]
                raise StepFailed(f"`serve` at {name} exited {code}: {' | '.join(tail)}")
    finally:
        for server, log in servers.values():
            if server.poll() is None:
                server.kill()
                server.wait()
            log.close()
    import csv

    with (root / out).open() as fh:
        got = {int(r["id"]): int(r["prediction"]) for r in csv.DictReader(fh)}
    truth = held_back_diagnoses()
    if set(got) != set(truth):
        raise StepFailed(f"predicted {len(got)} patients, expected the {len(truth)} of lab_to_predict.csv")
    for pid in sorted(got):
        print(f"  patient {pid}: {'benign' if got[pid] else 'malignant'}")
    agree = sum(got[i] == truth[i] for i in truth) / len(truth)
    print(f"{sum(got[i] == truth[i] for i in truth)}/{len(truth)} predictions match the diagnoses the data set records")
    _expect_ok(_cli(root, "audit", "verify", str(WORK / "audit"), "--deployment", str(DEPLOYMENT)),
               "audit verify after the prediction request")
    return agree


def run(root: Path, *, training_only: bool, timeout_s: float) -> int:
    """Every step of the example; returns the exit code (0 only if all of them worked)."""
    import shutil

    work = root / WORK
    try:
        _step("1/6 example keys: made private (git does not keep file modes)")
        for name in PEERS:
            os.chmod(root / "peers" / "keys" / f"{name}.key", 0o600)
        if work.exists():
            shutil.rmtree(work)
        for sub in ("logs", "results"):
            (work / sub).mkdir(parents=True)
        _step("2/6 policy check against the deployment")
        _expect_ok(_cli(root, "policy", "check", str(POLICY), "--deployment", str(DEPLOYMENT)), "policy check")
        _step("3/6 each organisation checks its data against the deployment")
        for name in PEERS:
            _expect_ok(_cli(root, "data", "check", f"peers/{name}.yaml"), f"data check of peers/{name}.yaml")
        _step("4/6 training: one `secure-split peer run` process per file in peers/")
        results = train(root, timeout_s)
        final = (results["lab"].get("metrics") or {}).get("final") or {}  # type: ignore[union-attr]
        acc = final.get("accuracy/labels")
        print(f"test accuracy of the split model: {acc:.3f}" if isinstance(acc, float) else f"final metrics: {final}")
        _step("5/6 audit logs verified")
        _expect_ok(_cli(root, "audit", "verify", str(WORK / "audit"), "--deployment", str(DEPLOYMENT)),
                   "audit verify")
        if training_only:
            print("training-only: prediction step skipped")
            return 0
        _step("6/6 predictions for the patients the lab has no diagnosis for (lab asks, hospitals serve)")
        agree = predict_held_back(root)
        if agree < MIN_AGREEMENT:
            raise StepFailed(f"only {agree:.0%} of the predictions match the recorded diagnoses "
                             f"(at least {MIN_AGREEMENT:.0%} expected from a model of test accuracy about 0.95)")
    except StepFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("example: every step worked")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: `run` (default) or `data`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", nargs="?", default="run", choices=["run", "data"])
    parser.add_argument("--root", type=Path, default=ROOT, help="the folder holding peers/ and policies/")
    parser.add_argument("--training-only", action="store_true", help="stop after training and the audit check")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds for training")
    args = parser.parse_args(argv)
    if args.command == "data":
        write_data(args.root)
        return 0
    return run(args.root.resolve(), training_only=args.training_only, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
