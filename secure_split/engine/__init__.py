"""The engine: the only layer that imports torch. Segments, forward/backward over the topology,
optimisers, checkpoints and privacy losses.

Modules (import the one you need; nothing is imported here, so `import secure_split.engine`
stays cheap):
- `tensors`: `to_wire` / `from_wire` between torch and the protocol's `WireTensor`, zero-copy.
- `models`: `build_segment`, `validate_layers`, `derive_seed` (the fixed table of layer types);
  `layers`: the modules behind residual blocks, embeddings, recurrent layers, sequence pooling.
- `sources`: `build_segment_module` / `build_segments` (every model source: layers, torchvision
  preset, own module), initial weights, commitments, `resolve_device`; `vision`: the torchvision
  presets (the one importer of torchvision); `interface`: an edge's agreed shape, dtype, bounds.
- `data`: `PeerData`, `load_peer_data`, `write_peer_data`, bundled `digits` and `breast_cancer`.
- `schedule`: `split_train_test`, `epoch_batches`, `eval_batches` (shared by coordinator and baseline).
- `executor`: `PeerExecutor` (sans-IO, one peer) and `Outgoing`.
- `metrics`: `TaskMetrics`, `StepMetrics`, `evaluate`.
- `privacy`: `distance_correlation` (NoPeek), clipping, noise, the label-defence hook.
- `checkpoint`: `save_checkpoint`, `list_checkpoints`, `load_checkpoint`.
- `baseline`: `train_centralized`, the unsplit reference.
- `zoo`: the demo models' layer lists.
"""
