"""Where the code runs: the CPU mode for megatron-core and Python-version shims."""
