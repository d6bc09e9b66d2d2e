"""The seam to megatron-core: its command line (argv.py) and every runtime replacement of a
library attribute (patches.py)."""
