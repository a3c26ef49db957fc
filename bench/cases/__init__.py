"""genflow bench row groups, one module per peer or topic (loaded by genflow.bench)."""
