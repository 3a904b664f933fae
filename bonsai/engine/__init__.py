"""The engine every pruning method shares: blocks run one at a time on calibration states, their statistics,
the refit (reconstruction) and OBS compensation, unit masks, logits over large vocabularies, global selection,
and the output folder's rules. Nothing here knows a method or an architecture (adapters hold the latter)."""
