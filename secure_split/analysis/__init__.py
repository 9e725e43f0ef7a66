"""Analysis tools above the engine: the leakage report (reconstruction and label attacks, the
privacy/utility trade-off, plots). Nothing in a running peer imports this package."""
