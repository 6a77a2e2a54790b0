"""Ahead-of-time compilation of a config's train step, without weights:
`lowering` builds the model, optimizer state and largest batch abstractly and
lowers the step; `topology` names TPU slices and chips; `report` compiles for
a target and reports per-chip memory, FLOPs and fit (`python -m speechjax.compile`).

It sits above the trainer (it builds what the trainer is given: the model
bundle and the batch shapes), beside the entry points."""
