"""Where a prediction request's results are written (the requester's predictions file).

Who takes part in a request and what flows between the parties is `secure_split.inference_routes`;
one party's part in a request is `peer/requests.py`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

__all__ = ["write_predictions"]


def write_predictions(path: str | Path, ids: np.ndarray, predictions: Mapping[str, np.ndarray]) -> Path:
    """Write predictions as CSV (`id,prediction`; one `prediction_SEGMENT` column per output with
    several outputs) or, for a name ending in .json, a JSON list of such rows. The file is
    private to the owner (mode 0600), written whole or not at all.

    Returns:
        The path written.
    """
    p = Path(path)
    columns = ["prediction"] if len(predictions) == 1 else [f"prediction_{s}" for s in predictions]
    values = [np.asarray(v).tolist() for v in predictions.values()]
    rows = [[int(i), *(int(col[k]) for col in values)] for k, i in enumerate(np.asarray(ids).tolist())]
    if p.suffix.lower() == ".json":
        lines = [json.dumps(dict(zip(["id", *columns], r, strict=True))) for r in rows]
        text = "[\n" + ",\n".join(lines) + "\n]\n"  # one sample per line
    else:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["id", *columns])
        writer.writerows(rows)
        text = buf.getvalue()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, p)
    return p

