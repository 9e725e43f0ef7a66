"""One peer's own data: reading it, checking it, preprocessing it; the bundled demo datasets.

- `peer_data`: `PeerData` (ids, float32 features, label tasks: what the executor reads) and the
  safetensors data file (`write_peer_data`, `read_safetensors_data`).
- `tables`: `load_site_data` reads CSV, Parquet, .npy or safetensors per the peer config's
  `data:` section into checked columns (`SiteData`); the only importer of pyarrow.
- `preprocess`: `fit_preprocessing` (imputation, scaling, one-hot) on training rows only, and
  `Preprocessing.apply`; saved in the peer's checkpoint manifest.
- `intake`: what a peer calls: `load_checked_site_data` (checked against the deployment before
  any network), `check_peer_data`, `load_peer_data`, `load_rows_to_predict`.
- `bundled`: scikit-learn's bundled `digits` and `breast_cancer`.

Nothing here ever leaves the peer: the protocol has no message kind for raw features or labels.
"""

from secure_split.engine.data.bundled import breast_cancer, breast_cancer_columns, digits
from secure_split.engine.data.intake import (
    check_peer_data,
    load_checked_site_data,
    load_peer_data,
    load_rows_to_predict,
    needs_data,
)
from secure_split.engine.data.peer_data import (
    DEFAULT_MAX_DATA_BYTES,
    PeerData,
    as_id_tensor,
    read_safetensors_data,
    write_peer_data,
)
from secure_split.engine.data.preprocess import ColumnFit, Preprocessing, fit_preprocessing
from secure_split.engine.data.tables import SiteData, load_site_data, site_from_arrays

__all__ = [
    "DEFAULT_MAX_DATA_BYTES",
    "ColumnFit",
    "PeerData",
    "Preprocessing",
    "SiteData",
    "as_id_tensor",
    "breast_cancer",
    "breast_cancer_columns",
    "check_peer_data",
    "digits",
    "fit_preprocessing",
    "load_checked_site_data",
    "load_peer_data",
    "load_rows_to_predict",
    "load_site_data",
    "needs_data",
    "read_safetensors_data",
    "site_from_arrays",
    "write_peer_data",
]
