"""PHI-free feature records: what the edge computes per series (:mod:`.features`) and what a
collector accepts (:mod:`.contract`). Shared by the edge, the export's drift reference and the
central monitor; imports nothing above the volume kernels."""
