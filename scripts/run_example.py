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
the audit logs are verified (`secure-split audit verify`); then predictions for the patients the
lab has no diagnosis for yet. Exits 0 only if every step worked. Everything a run writes goes to
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


def example_data() -> dict[str, str]:
    """The three CSV files, as text: scikit-learn's bundled breast-cancer set split by columns.

    Patient ids are 10001..10569. hospital_a misses 12 patients and has 6 blank cells in
    `mean_smoothness` (imputed by its peer config); hospital_b misses 12 other patients, lists its
    rows in another order, and adds `clinic`, a categorical column (synthetic: which of its three
    clinics saw the patient; one-hot encoded by its peer config); the lab has no diagnosis yet
    for 20 patients both hospitals hold (0 malignant, 1 benign, as scikit-learn codes them):
    those are the rows the example predicts.
    """
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
    return {name: "\n".join(lines) + "\n" for name, lines in
            (("hospital_a", a_lines), ("hospital_b", b_lines), ("lab", lab_lines))}


def write_data(root: Path) -> None:
    """Write peers/data/NAME.csv for the three organisations."""
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


def predict_held_back(root: Path) -> None:
    """Predict the diagnosis of the 20 patients the lab holds no diagnosis for.

    TODO(vertical inference, issue 16): the lab runs `secure-split predict` with those patient
    ids and the hospitals run `secure-split serve` on their own rows (ids aligned by PSI for the
    request; the policy's serving flows decide who may ask); then every party's audit log is
    verified again. Vertical (concat) inference is being built on the new peer layer; until it
    lands this step fails rather than pretend.
    """
    del root
    raise StepFailed("prediction step: vertical (concat) inference is not built yet (issue 16); "
                     "run with --training-only to check everything up to here")


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
        _step("6/6 predictions for the patients the lab has no diagnosis for")
        predict_held_back(root)
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
