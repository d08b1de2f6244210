"""Shadow evaluation: the edge's shadow-mode predictions joined with the verified diagnoses that
arrive later, judged per segment, and the promotion gate."""
