"""Inference engines shared by synthesis, evaluation and the preprocessing scorer.

`engine` holds the types (sampling settings, generations, scores) and the backend choice;
`hf_engine` and `vllm_engine` implement generate + score; `trace_scorer` scores whole traces for
tools/preprocess_traces.py; `models` loads local HF checkpoints.
"""
