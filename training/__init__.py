"""Training of GILL's learned parts (not part of the `gill_pipeline` library, which never imports it).

Entry points: `train_gill.py` (the main loop), `precompute.py` (SD text-encoder targets), `train_decision.py`
(the retrieve/generate decision head). See docs/training.md.
"""
