"""The schedules of a peer (see `secure_split.peer.schedule`): one module each, none imports another."""
