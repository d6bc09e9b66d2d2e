"""Teacher and reference log-prob scoring with HF causal LMs."""
