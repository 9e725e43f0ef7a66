"""Sans-IO sub-protocols of a peer: id alignment (PSI), CKKS context distribution, the masked HE
merge, weight hand-off and averaging. Each takes messages and returns `peer.effects.Effect`s."""
