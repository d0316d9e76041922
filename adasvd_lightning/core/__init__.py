"""Algorithm core: needs only torch (and transformers for model surgery / save-load).

Nothing in this sub-package may import Lightning; the Lightning-facing layers build on top of it.
"""
