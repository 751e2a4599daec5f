"""What psctl keeps on disk: model files (:mod:`.modelfile`) and shard checkpoints
(:mod:`.checkpoint`)."""
