"""secure_split: split learning across organisations that may not share raw data.

Layers (each imports only those below it): protocol, crypto, transport, policy, audit, engine,
scenarios, then peer and analysis side by side, cli. Shared base modules with no third-party I/O
under all of them: errors, canonical, yamlfile, config, topology, architecture, data_source,
deployment_diff. docs/internals.md is the contract page between the layers.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2
