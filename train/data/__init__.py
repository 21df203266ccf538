"""Input data for the trainer: procedural datasets (``synthetic``) and the grain pipeline
(``pipeline``: sources by name, sharded checkpointable train iterator, padded eval batches)."""
