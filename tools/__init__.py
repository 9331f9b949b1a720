"""Command line tools of pfsyncd (pfctl, ...): gRPC clients of a node, nothing more."""
