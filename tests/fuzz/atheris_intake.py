"""Coverage-guided fuzzing of a peer's inbound path with atheris (libFuzzer).

    python tests/fuzz/atheris_intake.py WORKDIR -runs=1000000 -rss_limit_mb=1280

Each input is an envelope (`intake.envelope`: a selector byte choosing the receiver, then the
frames); the corpus starts from the valid seeds. Any exception other than a refusal, or RSS over
the limit, stops the run with a crash report and a non-zero exit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["secure_split"]):
    from tests.fuzz.intake import IntakeHarness, envelope, unenvelope


def main() -> None:
    workdir = Path(sys.argv[1])
    harness = IntakeHarness.build(workdir)
    corpus = workdir / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for index, (receiver, frames) in enumerate(harness.seeds):
        (corpus / f"seed{index}").write_bytes(envelope(0 if receiver == "lh" else 1, frames))
    receivers = ("lh", "owner")

    def one_input(data: bytes) -> None:
        selector, frames = unenvelope(data)
        harness.feed(receivers[selector % 2], list(frames))

    atheris.Setup([sys.argv[0], *sys.argv[2:], str(corpus)], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
