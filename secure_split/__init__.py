"""secure_split: split learning across organisations that may not share raw data.

Layers (each imports only those below it): protocol, crypto, transport, policy, audit,
engine, peer, cli. Shared base modules with no third-party I/O: errors, canonical, config.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 2
